"""Changing a device's settings over MQTT with a signed `config` command."""

from __future__ import annotations

import json
import threading
import time

from device_agent.mqtt import MqttClient
from device_agent.protocol import topics
from device_agent.protocol.commands import ConfigCommand, Reply
from host_tools.ask import ask
from host_tools.cli.base import command_signer
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


def test_a_reply_lost_on_its_way_to_the_host_comes_again_when_the_host_is_back(agents, mosquitto, keys):
    """The host's connection drops as the device's reply arrives, which its clean session then loses.
    Back, the host sends the command again; the device, which runs no command twice, sends the reply
    it kept — also once restarted. Without that the host said 'did not answer' of a device that had
    taken the change."""
    agent = agents.start("forgetful")
    assert agent.wait_for_api() and announced(mosquitto, "forgetful")
    host = MqttClient(client_id=f"test-forgetful-{time.time_ns()}", broker=mosquitto, reconnect_max_delay=1,
                      held_acks=True)
    host.connect()
    lost: list[Reply] = []
    deliver = host._client.on_message

    def losing(client, userdata, message):
        if message.topic == topics.reply("forgetful") and not lost:
            lost.append(Reply.from_payload(message.payload))
            threading.Thread(target=lambda: (host.drop(), host.connect_in_background())).start()
            return  # not acknowledged: it goes with the connection
        deliver(client, userdata, message)
    host._client.on_message = losing
    signer = command_signer(keys["key"], 300)
    sent: list[bytes] = []

    def command(cid):
        made = ConfigCommand(cid, time.time(), {"keep_versions": 4})
        sent.append(signer(made.to_payload()))
        return made
    try:
        reply = ask(host, "forgetful", command, 20, signer)
        assert lost and reply.ok and reply.command_id == lost[0].command_id and reply.body == lost[0].body
        assert host.connections == 2 and reply.body["settings"]["keep_versions"] == 4
        assert "was delivered again; it is done: sending its reply again" in agent.log.read_text()
    finally:
        host.disconnect()
    assert agent.log.read_text().count("settings changed by the host") == 1  # it ran once

    # Restarted, the device still has the reply: the same command gets it, and changes nothing again.
    restart(agent)
    assert announced(mosquitto, "forgetful")
    replies: list[Reply] = []
    again = MqttClient(client_id=f"test-forgetful-again-{time.time_ns()}", broker=mosquitto)
    again.subscribe(topics.reply("forgetful"), lambda t, p: replies.append(Reply.from_payload(p)))
    again.connect()
    try:
        again.publish(topics.command("forgetful"), sent[0], qos=1)
        assert wait_until(lambda: replies, 10)
        assert replies[0].command_id == reply.command_id and replies[0].body == reply.body
    finally:
        again.disconnect()
