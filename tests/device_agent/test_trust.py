"""The trust store: what a device trusts, all-or-nothing changes, and failing closed when damaged."""

import pytest

from device_agent.bundle.signing import key_id, load_public_key, sign, trusted_keys, verify, load_private_key
from device_agent.errors import PolicyError, SignatureError
from device_agent.trust import TrustStore


@pytest.fixture
def store(tmp_path, keys):
    return TrustStore(tmp_path, trusted_keys([keys["pub"]]))


def ids(keys, *names):
    return [key_id(load_public_key(keys[n])) for n in names]


def test_a_change_is_all_or_nothing_and_survives_a_restart(store, tmp_path, keys):
    release, rogue = ids(keys, "pub", "rogue_pub")
    with pytest.raises(PolicyError, match="not a PEM public key"):
        store.change([keys["rogue_pub"].read_text(), "garbage"], [release])
    assert set(store) == {release} and not (tmp_path / "trust.json").exists()

    store.change([keys["rogue_pub"].read_text()], [release])
    again = TrustStore(tmp_path, trusted_keys([keys["pub"]]))  # the config still names the revoked key
    assert set(again) == {rogue} and again.revoked == {release}
    with pytest.raises(SignatureError, match="has been revoked"):
        verify(b"m", sign(load_private_key(keys["key"]), b"m"), again)
    assert verify(b"m", sign(load_private_key(keys["rogue_key"]), b"m"), again) == rogue


def test_no_change_may_leave_the_device_without_a_key(store, keys):
    with pytest.raises(PolicyError, match="no trusted key"):
        store.change([], ids(keys, "pub"))
    assert set(store) == set(ids(keys, "pub"))


@pytest.mark.parametrize("content", ["{not json", '{"added": {"x": "nope"}, "revoked": []}', '{"revoked": [1]}'])
def test_a_damaged_trust_file_trusts_nothing_until_repaired(tmp_path, keys, content):
    (tmp_path / "trust.json").write_text(content)
    damaged = TrustStore(tmp_path, trusted_keys([keys["pub"]]))
    assert len(damaged) == 0 and "is damaged" in damaged.describe()["problem"]
    with pytest.raises(SignatureError, match="trusts no key"):
        verify(b"m", sign(load_private_key(keys["key"]), b"m"), damaged)
    with pytest.raises(PolicyError, match="is damaged"):
        damaged.change([keys["rogue_pub"].read_text()], [])
