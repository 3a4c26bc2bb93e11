"""Versions are unpacked side by side; `current` moves only on activate, in one atomic step."""

import os
import shutil

import pytest

from device_agent.bundle import BundleReader
from device_agent.bundle.signing import trusted_keys
from device_agent.errors import SignatureError, StorageError
from device_agent.store import BundleStore


def test_install_keeps_current_until_activate(make_bundle, keys, tmp_path):
    store = BundleStore(tmp_path)
    trusted = trusted_keys([keys["pub"]])
    v1 = store.install(make_bundle("1.0.0"), trusted)
    store.activate(v1)
    v2 = store.install(make_bundle("1.1.0"), trusted)
    assert store.active().manifest.version == "1.0.0"  # installed is not active
    store.activate(v2)
    assert store.active().manifest.version == "1.1.0"
    assert os.readlink(tmp_path / "current") == os.path.relpath(v2.directory, tmp_path)
    assert v1.directory.is_dir()  # the previous version stays for rollback
    assert store.installed(v1.sha256).manifest.version == "1.0.0"
    assert not list(store.staging.iterdir())


def test_a_refused_bundle_leaves_no_trace_and_does_not_touch_current(make_bundle, keys, tmp_path):
    store = BundleStore(tmp_path)
    trusted = trusted_keys([keys["pub"]])
    store.activate(store.install(make_bundle("1.0.0"), trusted))
    before = sorted(p.name for p in store.bundles.iterdir())
    with pytest.raises(SignatureError):
        store.install(make_bundle("2.0.0", key=keys["rogue_key"]), trusted)
    assert sorted(p.name for p in store.bundles.iterdir()) == before
    assert not list(store.staging.iterdir())
    assert store.active().manifest.version == "1.0.0"


def test_no_current_link_means_no_active_bundle(tmp_path):
    assert BundleStore(tmp_path).active() is None


def test_commit_keeps_the_newest_versions_and_removes_the_rest(make_bundle, keys, tmp_path):
    store = BundleStore(tmp_path)
    trusted = trusted_keys([keys["pub"]])
    versions = []
    for v in ("1.0.0", "1.1.0", "1.2.0"):  # as updates do it: install, activate, commit
        versions.append(store.install(make_bundle(v), trusted))
        store.activate(versions[-1])
        store.commit(versions[-1], keep=2)
    assert store.committed() == [v.directory.name for v in versions[1:]]
    assert sorted(p.name for p in store.bundles.iterdir()) == sorted(v.directory.name for v in versions[1:])
    assert store.rollback_target().manifest.version == "1.1.0"


def test_a_committed_version_whose_files_are_gone_is_not_a_rollback_target(make_bundle, keys, tmp_path):
    import shutil

    store = BundleStore(tmp_path)
    trusted = trusted_keys([keys["pub"]])
    for v in ("1.0.0", "1.1.0", "1.2.0"):
        bundle = store.install(make_bundle(v), trusted)
        store.activate(bundle)
        store.commit(bundle, keep=3)
    shutil.rmtree(store.bundles / store.committed()[1])  # 1.1.0 damaged on the SD card
    assert store.rollback_target().manifest.version == "1.0.0"


def test_a_corrupt_committed_list_means_nothing_to_roll_back_to_not_a_crash(make_bundle, keys, tmp_path):
    store = BundleStore(tmp_path)
    store.activate(store.install(make_bundle("1.0.0"), trusted_keys([keys["pub"]])))
    (tmp_path / "committed.json").write_text("{torn")
    assert store.committed() == [] and store.rollback_target() is None


def test_commit_removes_leftovers_but_never_the_current_version(make_bundle, keys, tmp_path):
    store = BundleStore(tmp_path)
    trusted = trusted_keys([keys["pub"]])
    v1 = store.install(make_bundle("1.0.0"), trusted)
    store.activate(v1)
    store.commit(v1, keep=1)
    leftover = store.install(make_bundle("1.1.0"), trusted)  # e.g. a version rolled back from
    v2 = store.install(make_bundle("1.2.0"), trusted)
    store.activate(v2)
    removed = store.commit(v1, keep=1)  # even a commit that does not name the current version
    assert leftover.directory.name in removed and v2.directory.is_dir() and v1.directory.is_dir()


def test_an_atomic_write_that_fails_leaves_the_old_file_and_no_partial_copy(tmp_path):
    from device_agent.store import write_atomically

    target = tmp_path / "committed.json"
    write_atomically(target, b'["a"]')
    write_atomically(target, b'["a", "b"]')
    assert target.read_bytes() == b'["a", "b"]' and sorted(p.name for p in tmp_path.iterdir()) == ["committed.json"]
    blocked = tmp_path / "blocked.json"
    blocked.mkdir()  # what is there cannot be replaced by a file
    with pytest.raises(IsADirectoryError):
        write_atomically(blocked, b"{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocked.json", "committed.json"] and blocked.is_dir()


def _free_mib(path) -> float:
    return shutil.disk_usage(path).free / 2**20


def test_room_for_an_update_is_made_from_leftovers_never_from_versions_kept_for_rollback(
        padded_bundle, keys, small_disk):
    store = BundleStore(small_disk(8) / "state")
    trusted = trusted_keys([keys["pub"]])
    committed = []
    for version in ("1.0.0", "1.1.0"):  # 2 MiB each, both committed, the second active
        committed.append(store.install(padded_bundle(version, 2), trusted))
        store.activate(committed[-1])
        store.commit(committed[-1], keep=3)
    rolled_back_from = store.install(padded_bundle("1.2.0", 2), trusted)  # installed, never committed
    orphan = store.download_path("ab" * 32)  # a partial download of a bundle nobody fetches any more
    orphan.write_bytes(b"x" * 2**20)
    (store.staging / "left-over").mkdir()
    new = "cd" * 32
    assert _free_mib(store.root) < 1.5

    store.make_room(new, 2**20, int(2.5 * 2**20), keep=3)
    assert not rolled_back_from.directory.exists() and not orphan.exists() and not list(store.staging.iterdir())
    assert [b.directory.exists() for b in committed] == [True, True]
    assert store.committed() == [b.directory.name for b in committed]

    with pytest.raises(StorageError) as refused:
        store.make_room(new, 2**20, 5 * 2**20, keep=3)
    assert str(refused.value).startswith(
        "not enough disk space: the bundle needs 1.0 MiB to download and 5.0 MiB unpacked, ")
    assert str(refused.value).endswith(
        " are free (1 earlier version takes 2.0 MiB, kept for rollback; keep_versions sets how many)")
    assert committed[0].directory.exists()  # refusing removed nothing that is kept

    store.make_room(new, 2**20, int(4.5 * 2**20), keep=1)  # keep_versions lowered since they were committed
    assert not committed[0].directory.exists() and store.committed() == [committed[1].directory.name]
    assert store.active().directory == committed[1].directory


def test_a_partial_download_of_the_same_bundle_counts_as_room_already_taken(small_disk):
    store = BundleStore(small_disk(4) / "state")
    sha = "ef" * 32
    with open(store.download_path(sha), "wb") as fh:  # an earlier attempt, its room reserved
        os.posix_fallocate(fh.fileno(), 0, 3 * 2**20)
    store.make_room(sha, 3 * 2**20, 0, keep=3)  # ~1 MiB free, but the 3 MiB are held already
    assert store.download_path(sha).exists()
    with pytest.raises(StorageError, match=r"needs 5\.0 MiB to download, 4\.0 MiB are free$"):
        store.make_room("01" * 32, 5 * 2**20, 0, keep=3)  # another bundle: that partial goes first
    assert not store.download_path(sha).exists()


def test_a_bundle_with_no_room_to_unpack_is_refused_before_a_file_is_written(padded_bundle, keys, small_disk):
    store = BundleStore(small_disk(3) / "state")
    with pytest.raises(StorageError, match=r"^not enough disk space to unpack the bundle: its files take 4\.0 MiB, "):
        store.install(padded_bundle("2.0.0", 4), trusted_keys([keys["pub"]]))
    assert not list(store.staging.iterdir()) and not list(store.bundles.iterdir())


def test_a_disk_that_fills_up_while_unpacking_is_a_storage_error_and_leaves_nothing(make_bundle, keys, small_disk):
    # A file system with room for data but not for one more file: a real full disk, found mid-way.
    store = BundleStore(small_disk(16, inodes=64) / "state")
    fillers = store.root / "fillers"
    fillers.mkdir()
    made = 0
    try:
        while True:
            (fillers / str(made)).touch()
            made += 1
    except OSError:
        pass
    for i in range(made - 2, made):  # room for the staging directory and its files/ only
        (fillers / str(i)).unlink()
    bundle = make_bundle("1.0.0")
    with pytest.raises(StorageError, match=r"^cannot unpack \S+: No space left on device$"):
        store.install(bundle, trusted_keys([keys["pub"]]))
    assert not list(store.staging.iterdir()) and not list(store.bundles.iterdir())
    with BundleReader(bundle) as reader:  # the store itself is fine once there is room again
        assert reader.manifest.unpacked_size > 0
    for path in fillers.iterdir():
        path.unlink()
    assert store.install(bundle, trusted_keys([keys["pub"]])).manifest.version == "1.0.0"
