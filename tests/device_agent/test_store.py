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
