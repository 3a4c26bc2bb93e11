"""Key rotation and revocation with a real agent, a real broker and the host CLI."""

from __future__ import annotations

import json

from device_agent.bundle.signing import generate_key_pair, key_id, load_public_key
from tests.conftest import edgefleet
from tests.test_agent_lifecycle import (
    V2, assert_answers_correctly, deploy, host_command, outcome, restart, start_on_v1, status,
)


def test_a_key_is_rotated_in_then_the_old_one_revoked_for_good(agents, mosquitto, make_bundle, keys, tmp_path,
                                                                expected_logits):
    new_key, new_pub = generate_key_pair(tmp_path / "keys", "next")
    old_id, new_id = key_id(load_public_key(keys["pub"])), key_id(load_public_key(new_pub))
    agent = start_on_v1(agents, make_bundle, mosquitto, "rotor")

    def keys_cli(*args, key=keys["key"]):
        result = edgefleet("keys", *args, "--device", "rotor", "--broker", mosquitto, "--key", key, "--json")
        return result.returncode, json.loads(result.stdout)["rotor"] if result.stdout else result.stderr

    def deploy_signed_by(bundle, key) -> dict:
        return outcome(host_command("deploy", bundle, "--device", "rotor", "--broker", mosquitto,
                                    "--timeout", 60, "--chunk-size", 8192, "--key", key), "rotor")

    assert "does not trust" in deploy(make_bundle("2.0.0", key=new_key), "rotor", mosquitto)["reason"]
    code, reply = keys_cli("rotate", keys["rogue_pub"], key=keys["rogue_key"])  # a stranger vouching for itself
    assert code == 1 and "does not trust" in reply["error"]

    code, reply = keys_cli("rotate", new_pub)  # vouched for by the key the device trusts
    assert code == 0 and {t["key_id"] for t in reply["trusted"]} == {old_id, new_id}
    assert deploy(make_bundle("2.0.0", key=new_key), "rotor", mosquitto)["state"] == "active"

    code, reply = keys_cli("revoke", old_id, key=new_key)
    assert code == 0 and reply["revoked"] == [old_id] and [t["key_id"] for t in reply["trusted"]] == [new_id]

    # The old key now counts for nothing: not for bundles, not for commands, not to be trusted again.
    bundle = deploy_signed_by(make_bundle("3.0.0"), new_key)
    assert bundle["state"] == "failed" and f"key {old_id}, which has been revoked" in bundle["reason"]
    rollback = edgefleet("rollback", "--device", "rotor", "--broker", mosquitto, "--json", "--key", keys["key"])
    assert rollback.returncode == 1 and "has been revoked" in json.loads(rollback.stdout)["rotor"]["reason"]
    code, reply = keys_cli("rotate", keys["pub"], key=new_key)
    assert code == 1 and "cannot be trusted again" in reply["error"]
    code, reply = keys_cli("revoke", new_id, key=new_key)  # the last key: the device would be locked out
    assert code == 1 and "no trusted key" in reply["error"]

    # For good: after a restart, though the config still names the old key.
    restart(agent)
    assert status(agent)["keys"] == {"trusted": [{"key_id": new_id, "source": "added"}], "revoked": [old_id],
                                     "problem": None}
    again = deploy_signed_by(make_bundle("3.0.0"), new_key)
    assert again["state"] == "failed" and "has been revoked" in again["reason"]
    listed = edgefleet("keys", "list", "--dir", tmp_path / "keys", "--device", "rotor", "--broker", mosquitto)
    assert listed.returncode == 0 and f"{new_id}  next" in listed.stdout
    assert f"rotor: trusts {new_id} (added); revoked {old_id}" in listed.stdout
    assert status(agent)["active_bundle"] == V2
    assert_answers_correctly(agent, expected_logits)


def test_key_commands_refuse_bad_input_in_one_line(mosquitto, tmp_path):
    not_a_key = tmp_path / "x.pub"
    not_a_key.write_text("hello")
    for args, message in [(("revoke", "nothex", "--device", "d"), "is not a key id"),
                          (("rotate", not_a_key, "--device", "d"), "is not a PEM public key")]:
        result = edgefleet("keys", *args, "--broker", mosquitto)
        assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr


def test_a_device_that_does_not_answer_a_trust_change_is_not_said_to_refuse_it(mosquitto, keys):
    result = edgefleet("keys", "revoke", "0123456789abcdef", "--device", "nobody-home", "--broker", mosquitto,
                       "--key", keys["key"], "--timeout", "1", "--expires-in", "60")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    # nobody-home has never connected: the broker keeps no command for it, so none is promised
    assert result.stdout.strip() == ("nobody-home: no answer (nobody-home has never connected to this broker: not "
                                     "installed yet, or a wrong device id? (the broker keeps commands only for "
                                     "devices it has seen))")
