"""Two agents set up with one device id (a cloned SD card), and two monitors given one name: the one
already running keeps its MQTT session, the other stays off the broker and says why. Real agent
processes, a real monitor, the test's Mosquitto."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

from device_agent.local_api import AgentClient
from device_agent.mqtt import MqttClient, Will
from device_agent.protocol import topics
from device_agent.protocol.reports import DeviceStatus
from tests.conftest import AgentProcess, Mosquitto, announced, edgefleet, wait_until


def status(agent: AgentProcess) -> dict:
    with AgentClient(agent.control_socket, timeout=10) as client:
        return client.status()


def test_a_clone_with_the_same_device_id_stays_off_the_broker_and_the_original_keeps_working(
        tmp_path, agents, mosquitto, keys, monitor):
    original = agents.start("pi-cloned", extra_args=("--reconnect-max-delay", "2"))
    assert original.wait_for_api() and announced(mosquitto, "pi-cloned")
    clone_dir = tmp_path / "clone"
    shutil.copytree(original.state_dir, clone_dir, ignore=shutil.ignore_patterns("agent.log"))
    clone = AgentProcess("pi-cloned", clone_dir, mosquitto, keys["pub"],
                         extra_args=("--reconnect-max-delay", "2"))
    try:
        assert clone.wait_for_api()
        assert wait_until(lambda: status(clone)["id_held_by"] is not None, 30), clone.log.read_text()[-3000:]
        held = status(clone)
        assert held["id_held_by"]["pid"] == original.proc.pid and not held["connected"]
        assert "device id pi-cloned is in use by another agent" in clone.log.read_text()
        time.sleep(3)  # a few of the clone's asks
        ours = status(original)
        assert ours["connected"] and clone.proc.pid in {r["pid"] for r in ours["id_rivals"]}
        # Commands reach the original, every time, and it never lost its connection.
        for _ in range(3):
            reply = json.loads(edgefleet("device", "status", "pi-cloned", "--broker", mosquitto, "--json").stdout)
            assert reply["pid"] == original.proc.pid
        assert "lost the connection" not in original.log.read_text()
        # Both sides say so: the clone on the device, the original's status in the host's registry.
        shown = subprocess.run([sys.executable, "-m", "device_agent", "status", "--control-socket",
                                clone.control_socket], capture_output=True, text=True, timeout=30).stdout
        assert f"another agent holds device id pi-cloned (host {held['id_held_by']['host']}, " \
               f"pid {original.proc.pid}" in shown
        assert wait_until(lambda: _registry(monitor, "pi-cloned").get("id_shared_with"), 15)
        assert [r["pid"] for r in _registry(monitor, "pi-cloned")["id_shared_with"]] == [clone.proc.pid]
        shown = edgefleet("devices", "show", "pi-cloned", "--db", monitor).stdout
        assert f"ID SHARED:  another agent uses this device id: host {held['id_held_by']['host']}, " \
               f"pid {clone.proc.pid} (turned away" in shown
        # The original goes away for good: the clone takes the id at its next ask.
        assert original.terminate() == 0
        assert wait_until(lambda: status(clone)["connected"], 30), clone.log.read_text()[-3000:]
        assert status(clone)["id_held_by"] is None
        reply = json.loads(edgefleet("device", "status", "pi-cloned", "--broker", mosquitto, "--json").stdout)
        assert reply["pid"] == clone.proc.pid
    finally:
        clone.cleanup()


def test_the_last_will_of_another_connection_under_the_id_does_not_leave_the_holder_shown_offline(
        agents, mosquitto):
    """A connection under the same device id that ends uncleanly (a clone's, as it steps back) makes
    the broker publish its last will — offline — over the holder's status; the holder says it again."""
    agent = agents.start("pi-willed")
    assert agent.wait_for_api() and announced(mosquitto, "pi-willed")
    will = DeviceStatus("pi-willed", online=False, timestamp=0.0, agent_version="0.0.0").to_payload()
    other = MqttClient(client_id=f"test-willed-{time.time_ns()}", broker=mosquitto,
                       will=Will(topics.status("pi-willed"), will))
    other.connect()
    time.sleep(0.5)  # after the agent's own status has come back to it
    seen: list[DeviceStatus] = []
    watcher = MqttClient(client_id=f"test-watch-{time.time_ns()}", broker=mosquitto)
    watcher.subscribe(topics.status("pi-willed"), lambda t, p: seen.append(DeviceStatus.from_payload(p)))
    watcher.connect()
    try:
        assert wait_until(lambda: seen, 10) and seen[-1].online
        other.drop()  # no DISCONNECT: the broker publishes the will
        assert wait_until(lambda: any(not s.online for s in seen), 10), "the broker did not publish the will"
        assert wait_until(lambda: seen[-1].online, 10), [s.online for s in seen]
        assert seen[-1].active_bundle is None and seen[-1].hardware is not None
        assert "its last will says offline; saying online again" in agent.log.read_text()
    finally:
        watcher.disconnect()
    # What a new subscriber gets, retained, is the agent's status, and the host says it is there.
    reply = edgefleet("device", "status", "pi-willed", "--broker", mosquitto, "--json")
    assert reply.returncode == 0, reply.stderr
    assert json.loads(reply.stdout)["pid"] == agent.proc.pid


def test_the_agent_tells_its_own_last_will_from_another_connections(tmp_path, keys):
    """A broker shutting down publishes every client's will — the agent's own too, to the agent,
    still connected for a moment: that one is not another connection's, and is not said over."""
    (tmp_path / "broker").mkdir()
    broker = Mosquitto(tmp_path / "broker")
    broker.start()
    agent = AgentProcess("pi-own-will", tmp_path / "agent", broker.address, keys["pub"],
                         extra_args=("--reconnect-max-delay", "1"))
    try:
        assert agent.wait_for_api() and announced(broker.address, "pi-own-will")
        time.sleep(0.5)  # its status has come back to it
        broker.stop()
        broker.start()
        assert announced(broker.address, "pi-own-will")
        assert agent.log.read_text().count("lost the connection") == 1
        assert "saying online again" not in agent.log.read_text()
    finally:
        agent.cleanup()
        broker.stop()


def _registry(db, device_id: str) -> dict:
    return json.loads(edgefleet("devices", "show", device_id, "--db", db, "--json").stdout)


def test_two_agents_with_one_id_started_together_settle_on_one(tmp_path, mosquitto, keys):
    """Started together, both may find nobody holding the id and connect; they then take the session
    from each other until the one that started later steps back."""
    pair = [AgentProcess("pi-twins", tmp_path / name, mosquitto, keys["pub"], extra_args=("--reconnect-max-delay", "2"))
            for name in ("a", "b")]
    try:
        assert all(agent.wait_for_api() for agent in pair)

        def settled() -> bool:
            states = [status(agent) for agent in pair]
            return sorted(s["connected"] for s in states) == [False, True] and any(s["id_held_by"] for s in states)
        assert wait_until(settled, 60, interval=0.5), "\n".join(a.log.read_text()[-2000:] for a in pair)
        holder = next(a for a in pair if status(a)["connected"])
        time.sleep(4)  # it stays that way
        assert settled() and status(holder)["connected"]
        shown = edgefleet("device", "status", "pi-twins", "--broker", mosquitto, "--json")
        assert shown.returncode == 0, shown.stderr + "\n".join(a.log.read_text()[-4000:] for a in pair)
        reply = json.loads(shown.stdout)
        assert reply["pid"] == holder.proc.pid
    finally:
        for agent in pair:
            agent.cleanup()


def test_a_second_monitor_with_the_same_name_is_one_line_and_the_first_keeps_ingesting(tmp_path, mosquitto):
    db = tmp_path / "fleet.db"
    name = f"dup-{time.time_ns()}"
    with open(tmp_path / "monitor.log", "wb") as log:
        first = subprocess.Popen([sys.executable, "-m", "host_tools", "monitor", "--broker", str(mosquitto),
                                  "--db", str(db), "--name", name], stderr=log)
    try:
        assert wait_until(db.exists, 15)
        second = edgefleet("monitor", "--broker", mosquitto, "--db", tmp_path / "other.db", "--name", name, timeout=30)
        assert second.returncode == 1
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: a monitor named '{name}' is already connected")
        assert f"pid {first.pid}" in lines[0] and "--name" in lines[0]
        assert first.poll() is None
        time.sleep(1)
        assert "lost the connection" not in (tmp_path / "monitor.log").read_text()
    finally:
        first.terminate()
        first.wait(10)
