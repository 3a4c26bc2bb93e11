"""Versions are unpacked side by side; `current` moves only on activate, in one atomic step."""

import os

import pytest

from device_agent.bundle.signing import trusted_keys
from device_agent.errors import SignatureError
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
