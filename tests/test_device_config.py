"""Changing a device's settings over MQTT with a signed `config` command."""

from __future__ import annotations

import json
import time

from device_agent.mqtt import MqttClient
from device_agent.protocol import topics
from device_agent.protocol.commands import ConfigCommand, Reply
from tests.conftest import announced, edgefleet, wait_until
from tests.test_agent_lifecycle import restart, status


def config(device, broker, *args, key=None):
    extra = ("--key", key) if key else ()
    result = edgefleet("device", "config", device, "--broker", broker, "--json", *args, *extra)
    return result.returncode, (json.loads(result.stdout) if result.returncode == 0 else result.stderr)


def test_settings_change_at_once_survive_a_restart_and_bad_ones_change_nothing(agents, mosquitto, keys):
    agent = agents.start("tuned", telemetry_interval=5.0)
    assert agent.wait_for_api() and announced(mosquitto, "tuned")
    code, body = config("tuned", mosquitto, "--set", "telemetry_interval=0.2", "--set", "keep_versions=5")
    assert code == 0 and body["settings"]["telemetry_interval"] == 0.2 and body["settings"]["keep_versions"] == 5
    assert body["changed_remotely"] == ["keep_versions", "telemetry_interval"]

    # At once: telemetry now comes five times a second instead of every five seconds.
    samples = []
    watcher = MqttClient(client_id="test-tuned", broker=mosquitto)
    watcher.subscribe(topics.telemetry("tuned"), lambda t, p: samples.append(time.monotonic()))
    watcher.connect()
    try:
        assert wait_until(lambda: len(samples) >= 6, 10), samples
    finally:
        watcher.disconnect()

    for bad, reason in [(("--set", "volume=11"), "cannot be set remotely"),
                        (("--set", "keep_versions=0"), "at least 1"),
                        (("--set", "keep_versions=2.5"), "whole number")]:
        code, err = config("tuned", mosquitto, *bad)
        assert code == 1 and reason in err and len(err.splitlines()) == 1
    code, err = config("tuned", mosquitto, "--set", "keep_versions=1", key=keys["rogue_key"])
    assert code == 1 and "does not trust" in err

    restart(agent)  # kept on the device, over the config file's values
    assert status(agent)["settings"]["keep_versions"] == 5
    code, body = config("tuned", mosquitto, "--reset", "keep_versions")
    assert code == 0 and body["settings"]["keep_versions"] == 3 and body["changed_remotely"] == ["telemetry_interval"]


def test_an_unsigned_config_command_is_refused_with_its_reason(agents, mosquitto):
    agent = agents.start("locked")
    assert agent.wait_for_api() and announced(mosquitto, "locked")
    replies = []
    host = MqttClient(client_id="test-locked", broker=mosquitto)
    host.subscribe(topics.reply("locked"), lambda t, p: replies.append(Reply.from_payload(p)))
    host.connect()
    try:
        host.publish(topics.command("locked"), ConfigCommand("c1", time.time(), {"keep_versions": 1}).to_payload())
        assert wait_until(lambda: replies, 10)
    finally:
        host.disconnect()
    assert not replies[0].ok and "not signed" in replies[0].error
    assert status(agent)["settings"]["keep_versions"] == 3
