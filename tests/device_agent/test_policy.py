"""What a device refuses from genuine bundles: expired, older than committed, other hardware."""

import dataclasses
import math

import pytest

from device_agent.bundle import Manifest
from device_agent.errors import ManifestError, PolicyError
from device_agent.update.policy import check_expiry, check_release, check_target, device_facts

FACTS = {"arch": "aarch64", "ram_mb": 3900, "accelerators": ["cuda"]}


@pytest.fixture
def manifest(make_bundle):
    from device_agent.bundle import BundleReader

    with BundleReader(make_bundle("2.0.0")) as reader:
        return reader.manifest


@pytest.mark.parametrize("target, message", [
    ({"arch": ["x86_64"]}, "this device is aarch64"),
    ({"min_ram_mb": 8000}, "needs 8000 MiB"),
    ({"accelerator": "tensorrt"}, "needs the tensorrt accelerator"),
])
def test_a_target_the_device_does_not_meet_is_refused(target, message):
    with pytest.raises(PolicyError, match=message):
        check_target(target, FACTS)


def test_a_target_the_device_meets_or_no_target_passes():
    check_target({"arch": ["aarch64", "armv7l"], "min_ram_mb": 2000, "accelerator": "cuda"}, FACTS)
    check_target({}, FACTS)
    check_target(None, FACTS)
    assert device_facts()["ram_mb"] > 0


@pytest.mark.parametrize("release, committed, refused", [
    (5, {"release": 6, "version": "1.0.0"}, True),     # counters decide when both have one
    (6, {"release": 6, "version": "9.0.0"}, False),
    (None, {"release": 6, "version": "2.0.1"}, True),  # else versions
    (None, {"release": None, "version": "1.9.9"}, False),
    (None, None, False),                               # nothing committed yet
])
def test_releases_only_go_up_unless_a_downgrade_is_allowed(manifest, release, committed, refused):
    m = dataclasses.replace(manifest, release=release)
    if refused:
        with pytest.raises(PolicyError, match="rollback attack"):
            check_release(m, committed, allow_downgrade=False)
        check_release(m, committed, allow_downgrade=True)
    else:
        check_release(m, committed, allow_downgrade=False)


def test_an_expired_bundle_is_refused(manifest):
    check_expiry(dataclasses.replace(manifest, expires_at=2e9), now=1.9e9)
    with pytest.raises(PolicyError, match="expired on 2033"):
        check_expiry(dataclasses.replace(manifest, expires_at=2e9), now=2.1e9)


@pytest.mark.parametrize("change", [{"release": -1}, {"release": True}, {"expires_at": "soon"},
                                    {"expires_at": math.nan}, {"expires_at": math.inf},  # NaN would never expire
                                    {"target": {"arch": "x86_64"}}, {"target": {"gpu": True}}])
def test_malformed_policy_fields_are_manifest_errors(manifest, change):
    with pytest.raises(ManifestError):
        Manifest.from_dict({**manifest.to_dict(), **change})
