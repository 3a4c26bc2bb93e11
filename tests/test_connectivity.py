"""A command to a device that is not there says why while it waits: offline since when, its
connection dropped, or never connected to this broker — from the statuses the broker retains."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time

import pytest

from device_agent.bundle.signing import generate_key_pair, key_id, load_public_key
from device_agent.mqtt import MqttClient
from device_agent.protocol import topics
from device_agent.protocol.reports import DeviceStatus
from host_tools.connectivity import NEVER_SEEN, SHORT_NEVER_SEEN, Connectivity
from host_tools.deploy import DeviceProgress, EventTracker
from tests.conftest import Mosquitto, announced, edgefleet, wait_until
from tests.test_agent_lifecycle import host_command, status


@pytest.fixture
def host(mosquitto, request):
    """A connected host-side client of the shared broker, as the host tools make one."""
    client = MqttClient(client_id=f"test-connectivity-{request.node.name}"[:64], broker=mosquitto)
    client.connect()
    yield client
    client.disconnect()


OFFLINE_SINCE = r"device offline since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d \(\d+s ago, when its agent stopped\)"


def test_a_signed_change_goes_to_every_device_at_once_and_waits_for_their_answers_together(
        agents, mosquitto, keys, tmp_path):
    """`keys rotate` to four devices: the one online takes it; two stopped ones are named offline
    after one wait, not one after the other; the one never seen is said to be so."""
    fleet = {name: agents.start(name) for name in ("all-on", "all-off-1", "all-off-2")}
    for name, agent in fleet.items():
        assert agent.wait_for_api() and announced(mosquitto, name)
    for name in ("all-off-1", "all-off-2"):
        assert fleet[name].terminate() == 0
    _, new_pub = generate_key_pair(tmp_path / "keys", "next")
    started = time.monotonic()
    rotated = edgefleet("keys", "rotate", new_pub, *[a for d in ("all-off-1", "all-on", "all-off-2", "all-never")
                                                     for a in ("--device", d)],
                        "--broker", mosquitto, "--key", keys["key"], "--timeout", "8", "--expires-in", "300")
    took = time.monotonic() - started
    assert rotated.returncode == 1 and "Traceback" not in rotated.stderr, rotated.stderr
    lines = rotated.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["all-off-1", "all-on", "all-off-2", "all-never"]
    assert re.fullmatch(rf"all-off-1: no answer \(all-off-1 did not answer within 8s: {OFFLINE_SINCE}\); it may "
                        r"still take the change if it reconnects within the command's 300 s", lines[0]), lines[0]
    assert lines[1].startswith("all-on: trusts ") and key_id(load_public_key(new_pub)) in lines[1]
    assert lines[2].startswith("all-off-2: no answer (all-off-2 did not answer within 8s: device offline since")
    assert lines[3] == f"all-never: no answer (all-never has {NEVER_SEEN})"
    assert took < 15  # one wait of 8 s for both offline devices (one after the other: over 16 s)


def test_a_stopped_device_is_said_to_be_offline_since_it_stopped_and_gets_the_command_when_it_returns(
        agents, mosquitto, keys, tmp_path, make_bundle):
    agent = agents.start("dozy")
    assert agent.wait_for_api() and announced(mosquitto, "dozy")
    assert agent.terminate() == 0  # a clean stop: the agent says offline itself, with the time

    started = time.monotonic()  # a question about its status is answered at once: the broker knows
    asked = edgefleet("device", "status", "dozy", "--broker", mosquitto, "--timeout", "60")
    assert asked.returncode == 1 and "Traceback" not in asked.stderr
    assert re.fullmatch(rf"error: dozy: {OFFLINE_SINCE}", asked.stderr.strip()), asked.stderr
    benched = edgefleet("bench", make_bundle(), "--device", "dozy", "--broker", mosquitto, "--timeout", "60")
    assert benched.returncode == 1 and "Traceback" not in benched.stderr  # after its "benchmarking..." line
    assert re.fullmatch(rf"error: dozy: {OFFLINE_SINCE}", benched.stderr.strip().splitlines()[-1]), benched.stderr
    assert time.monotonic() - started < 50

    _, new_pub = generate_key_pair(tmp_path / "keys", "next")
    new_id = key_id(load_public_key(new_pub))
    rotated = edgefleet("keys", "rotate", new_pub, "--device", "dozy", "--broker", mosquitto, "--key", keys["key"],
                        "--timeout", "1", "--expires-in", "300")
    assert rotated.returncode == 1 and "Traceback" not in rotated.stderr
    assert re.fullmatch(rf"dozy: no answer \(dozy did not answer within 1s: {OFFLINE_SINCE}\); it may still take the "
                        r"change if it reconnects within the command's 300 s", rotated.stdout.strip()), rotated.stdout

    configured = edgefleet("device", "config", "dozy", "--set", "telemetry_interval=7", "--broker", mosquitto,
                           "--key", keys["key"], "--timeout", "1", "--expires-in", "300")
    assert configured.returncode == 1 and "Traceback" not in configured.stderr
    assert re.fullmatch(rf"error: dozy did not answer within 1s: {OFFLINE_SINCE}; it may still take the change if "
                        r"it reconnects within the command's 300 s", configured.stderr.strip()), configured.stderr

    agent.start()  # ... and so it does: the commands waited in its session
    assert agent.wait_for_api()
    # and soon: the bench was not sent at all (queued, it would go first and wait 30 s for a bundle
    # nobody serves any more)
    assert wait_until(lambda: new_id in {k["key_id"] for k in status(agent)["keys"]["trusted"]}, 15), \
        agent.log.read_text()[-3000:]

    def interval() -> float:
        shown = edgefleet("device", "config", "dozy", "--broker", mosquitto, "--key", keys["key"], "--json")
        return json.loads(shown.stdout)["settings"]["telemetry_interval"] if shown.returncode == 0 else None
    assert wait_until(lambda: interval() == 7, 30)


def test_a_killed_device_is_said_to_be_offline_because_its_connection_dropped(agents, mosquitto, keys):
    agent = agents.start("crashy")
    assert agent.wait_for_api() and announced(mosquitto, "crashy")
    agent.kill()  # no goodbye: the broker publishes its last will
    result = edgefleet("rollback", "--device", "crashy", "--broker", mosquitto, "--timeout", "2", "--json",
                       "--key", keys["key"])
    outcome = json.loads(result.stdout)["crashy"]
    assert result.returncode == 1 and outcome["state"] == "timed_out"
    assert outcome["reason"] == "no outcome within 2s: device offline (its connection dropped)"
    # on a terminal's streams: why it waits, while it waits, and that the rollback waits in its session
    said = edgefleet("rollback", "--device", "crashy", "--broker", mosquitto, "--timeout", "2", "--expires-in", "300",
                     "--key", keys["key"])
    assert said.returncode == 1 and said.stderr == "crashy: offline (connection dropped); waiting up to 2 s for it\n"
    assert said.stdout == ("crashy: timed_out (no outcome within 2s: device offline (its connection dropped)); it may "
                           "still take the change if it reconnects within the command's 300 s\n")


def test_the_progress_of_a_command_says_why_a_device_has_not_answered_as_soon_as_the_broker_tells(mosquitto, host):
    device = MqttClient(client_id="test-connectivity-device", broker=mosquitto)
    device.connect()
    updates: dict[str, list] = {"never-01": [], "gone-01": [], "late-01": []}
    seen = threading.Condition()

    def on_update(progress):
        with seen:
            updates[progress.device_id].append((progress.state, progress.reason))
            seen.notify_all()

    try:
        device.publish(topics.status("gone-01"), DeviceStatus("gone-01", False, 0.0).to_payload(), retain=True,
                       wait=5)
        tracker = EventTracker(host, list(updates), lambda p: p, on_update, watch_connectivity=True)
        tracker.send(b"{}")
        with seen:
            assert seen.wait_for(lambda: updates["never-01"] and updates["gone-01"] and updates["late-01"], 10)
        assert updates["never-01"] == [("pending", SHORT_NEVER_SEEN)]
        assert updates["gone-01"] == [("pending", "offline (connection dropped)")]
        # A status that is not one, or names another device, changes nothing; the device's own does.
        device.publish(topics.status("late-01"), b"not json", retain=True, wait=5)
        device.publish(topics.status("late-01"), DeviceStatus("gone-01", True, 1.0).to_payload(), wait=5)
        device.publish(topics.status("late-01"), DeviceStatus("late-01", True, 1.0).to_payload(), wait=5)
        with seen:
            assert seen.wait_for(lambda: len(updates["late-01"]) == 2, 10)
        assert updates["late-01"] == [("pending", SHORT_NEVER_SEEN), ("pending", None)]
        assert tracker.wait(0.1)["never-01"] == DeviceProgress("never-01", "unreachable", 0.0, NEVER_SEEN)
        assert tracker.wait(0.5)["late-01"].reason == "no outcome within 0.5s"
        assert tracker.wait(0.1)["gone-01"].reason == "no outcome within 0.1s: device offline (its connection dropped)"
        tracker.close()
    finally:
        for name in ("gone-01", "late-01"):
            device.publish(topics.status(name), b"", retain=True, wait=5)  # the shared broker forgets them
        device.disconnect()


def test_watching_no_longer_after_close(host):
    changes = []
    watch = Connectivity(host, ["shut-01"], changes.append)
    watch.watch()
    watch.close()  # before it settles: nothing is said after
    assert not wait_until(lambda: changes, 2)
    assert watch.note("shut-01") is None


def test_deploy_says_in_full_why_each_device_did_not_take_the_bundle(mosquitto, make_bundle):
    result = edgefleet("deploy", make_bundle(), "--device", "ghost-2", "--broker", mosquitto, "--timeout", "2")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    # the progress bar cuts a long reason short; the line after it does not
    assert result.stderr.strip().splitlines()[-1] == f"ghost-2: unreachable ({NEVER_SEEN})"


def test_garbage_on_a_status_topic_is_not_taken_for_a_status(host):
    from tests.test_end_to_end import GARBAGE

    watch = Connectivity(host, ["junk-01"])
    for payload in GARBAGE + [DeviceStatus("junk-01", False, 5.0).to_payload()[:-1]]:
        watch._on_status(topics.status("junk-01"), payload)  # as the network thread would, without raising
    assert watch.note("junk-01") is None  # nothing taken: not offline, and not settled yet
    watch._on_status(topics.status("junk-01"), DeviceStatus("junk-01", False, time.time() - 300).to_payload())
    assert re.fullmatch(OFFLINE_SINCE.replace(r"\d+s ago", "5m ago"), watch.note("junk-01"))
    assert re.fullmatch(r"offline since \d\d:\d\d:\d\d", watch.note("junk-01", short=True))


def test_a_device_that_never_connected_does_not_end_the_wait_for_the_others(agents, mosquitto, make_bundle):
    agent = agents.start("lively")
    assert agent.wait_for_api() and announced(mosquitto, "lively")
    result = edgefleet("deploy", make_bundle(), "--device", "ghost-3", "--device", "lively", "--broker", mosquitto,
                       "--timeout", "60", "--chunk-size", "8192", "--json")
    outcomes = json.loads(result.stdout)
    assert result.returncode == 1
    assert (outcomes["ghost-3"]["state"], outcomes["lively"]["state"]) == ("unreachable", "active")


def test_the_status_of_an_offline_device_says_what_it_last_ran(mosquitto, host):
    try:
        host.publish(topics.status("gone-02"), DeviceStatus("gone-02", False, time.time() - 120,
                                                            active_bundle="digits-cnn 1.0.0").to_payload(),
                     retain=True, wait=5)
        result = edgefleet("device", "status", "gone-02", "--broker", mosquitto)
    finally:
        host.publish(topics.status("gone-02"), b"", retain=True, wait=5)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert re.fullmatch(r"error: gone-02: " + OFFLINE_SINCE.replace(r"\d+s ago", "2m ago") +
                        "; it last ran digits-cnn 1.0.0", result.stderr.strip()), result.stderr


def test_a_device_that_answers_is_followed_though_the_broker_holds_no_status_of_it(host):
    from device_agent.protocol.reports import DeploymentEvent

    tracker = EventTracker(host, ["quiet-01"], lambda p: p, watch_connectivity=True)
    tracker.send(b"{}")
    event = DeploymentEvent("quiet-01", tracker.command_id, "downloading", "digits-cnn 1.0.0", 0.5)
    host.publish(topics.events("quiet-01"), event.to_payload(), wait=5)
    outcome = tracker.wait(3)["quiet-01"]  # past the settling second: no status arrived
    tracker.close()
    assert (outcome.state, outcome.progress) == ("timed_out", 0.5)
    assert outcome.reason == "no outcome within 3s (the last it said: downloading)"


def test_a_deploy_learns_the_outcome_a_device_reached_while_the_broker_was_down(tmp_path, agents, make_bundle):
    """Found by a chaos run (connections cut and stalled, broker restarts, agents killed): a device
    that finished its update while the broker was down sent its final event on reconnecting, before
    the host had reconnected and subscribed again, and the deploy said it timed out though the
    device ran the new bundle. Its retained status carries the outcome now, across restarts too."""
    broker = Mosquitto(tmp_path)  # its own: this test restarts it
    broker.start()
    try:
        # The agent is back within a second of the broker, the host (backing off 1, 2, 4 s) later.
        agent = agents.start("pi-lost", broker=broker.address,
                             extra_args=("--trial-seconds", "4", "--reconnect-max-delay", "1"))
        assert agent.wait_for_api() and agent.wait_for_broker()
        deploy = host_command("-v", "deploy", make_bundle(), "--device", "pi-lost", "--broker", broker.address,
                              "--timeout", "60")
        for line in deploy.stderr:
            if "pi-lost: activating" in line:
                break
        broker.stop()  # no persistence: the broker forgets everything
        assert wait_until(lambda: status(agent)["update_state"] == "idle", 30)  # its trial ended with no broker
        broker.start()
        out, err = deploy.communicate(timeout=90)
        assert deploy.returncode == 0, err
        assert json.loads(out)["pi-lost"]["state"] == "active"
        assert "pi-lost: active (as its status says)" in err

        agent.kill()
        agent.start()
        assert agent.wait_for_api()
        shown = subprocess.run([sys.executable, "-m", "device_agent", "status", "--control-socket",
                                agent.control_socket], capture_output=True, text=True, timeout=60)
        when = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
        assert re.search(rf"last update: +active digits-cnn 1.0.0 \({when}, command [0-9a-f]{{32}}\)", shown.stdout), \
            shown.stdout + shown.stderr
    finally:
        broker.stop()
