"""Nothing lost: a real agent keeps measuring while the broker is gone (and through its own
restart), and the host ends up with every sample exactly once."""

from __future__ import annotations

import logging
import os
import signal
import time

import pytest

from device_agent.mqtt import MqttClient
from device_agent.protocol import topics
from device_agent.protocol.reports import DeviceStatus
from host_tools.fleet.ingest import Ingest
from host_tools.fleet.store import FleetStore
from tests.conftest import Mosquitto, fill_disk, wait_until

OUTAGE_S = 60
RECONNECT_MAX_S = 5


@pytest.mark.waits
def test_a_60_second_broker_outage_with_an_agent_restart_loses_and_duplicates_nothing(tmp_path, agents):
    (tmp_path / "broker").mkdir()
    broker = Mosquitto(tmp_path / "broker")  # its own broker: this test stops it for a minute
    broker.start()
    store = FleetStore(tmp_path / "fleet.db")
    host = MqttClient(client_id="test-outage-ingest", broker=broker.address, clean_session=False,
                      reconnect_max_delay=RECONNECT_MAX_S)  # the host's ingest comes back as soon, too
    Ingest(host, store).start()
    host.connect()
    try:
        # Back-off capped at 5 s (default 30): after a minute away the agent tries again within 5 s.
        agent = agents.start("pi-outage", broker=broker.address, telemetry_interval=1.0,
                             extra_args=("--reconnect-max-delay", str(RECONNECT_MAX_S)))
        assert wait_until(lambda: store.telemetry_count("pi-outage") >= 3, 30)
        broker.stop()
        outage_started, outage_from = time.monotonic(), time.time()
        time.sleep(OUTAGE_S / 3)
        agent.kill()      # SIGKILL mid-outage: what it queued must survive on disk
        agent.start()
        time.sleep(OUTAGE_S - (time.monotonic() - outage_started))
        outage_to = time.time()
        broker.start()

        def caught_up() -> bool:
            index = store.sample_index("pi-outage")
            return bool(index) and index[-1][1] > outage_to and agent_pending(store) == 0
        # The default cap would leave either away up to 30 s more; 5 s plus the catching up, here.
        assert wait_until(caught_up, 4 * RECONNECT_MAX_S, interval=0.5), store.sample_index("pi-outage")[-5:]
        seqs = [seq for seq, _ in store.sample_index("pi-outage")]
        assert seqs == list(range(1, seqs[-1] + 1))  # every sample, each once, no gap
        # Measured during the outage (a sample a second, but for the agent's few seconds of
        # restart), kept on the device and delivered afterwards.
        during = [t for _, t in store.sample_index("pi-outage") if outage_from <= t <= outage_to]
        assert len(during) >= OUTAGE_S - 15, len(during)  # less the agent's restart (a few seconds)
    finally:
        host.disconnect()
        broker.stop()


def agent_pending(store: FleetStore, device_id: str = "pi-outage") -> int:
    """What the newest sample says the agent still had queued when it was taken."""
    (row,) = [r for r in store.devices() if r.device_id == device_id]
    return (row.telemetry or {}).get("queue", {}).get("pending", 0)


def test_a_full_disk_while_the_broker_is_away_loses_the_samples_it_cannot_keep_and_nothing_else(
        tmp_path, agents, small_disk):
    (tmp_path / "broker").mkdir()
    broker = Mosquitto(tmp_path / "broker")  # its own broker: this test stops it
    broker.start()
    store = FleetStore(tmp_path / "fleet.db")
    host = MqttClient(client_id="test-full-disk-ingest", broker=broker.address, clean_session=False,
                      reconnect_max_delay=2)
    Ingest(host, store).start()
    host.connect()
    try:
        state = small_disk(12)
        agent = agents.start("pi-full", broker=broker.address, telemetry_interval=0.2, state_dir=state / "state",
                             log=tmp_path / "agent.log", extra_args=("--reconnect-max-delay", "2"))
        assert wait_until(lambda: store.telemetry_count("pi-full") >= 3, 30), agent.log.read_text()[-3000:]
        broker.stop()  # samples queue up on the device...
        time.sleep(1.5)
        filler = fill_disk(state)  # ...until its disk is full
        time.sleep(2)
        assert "cannot queue telemetry: database or disk is full; samples are lost until there is room" \
            in agent.log.read_text()
        filler.unlink()
        refilled = time.time()
        # This broker keeps no sessions across a restart: the host must subscribe again before the
        # agent sends its backlog, or the broker drops it (a test's race, not the agent's), so the
        # agent is paused until a status sent after the restart has reached the host's database.
        os.kill(agent.proc.pid, signal.SIGSTOP)
        try:
            broker.start()
            probe = MqttClient(client_id=f"probe-{time.time_ns()}", broker=broker.address)
            probe.connect()
            try:
                def host_listens() -> bool:
                    probe.publish(topics.status("probe-dev"), DeviceStatus("probe-dev", True, time.time()).to_payload(),
                                  qos=1, wait=5)
                    return any(r.device_id == "probe-dev" for r in store.devices())
                assert wait_until(host_listens, 20, interval=0.5)
            finally:
                probe.disconnect()
        finally:
            os.kill(agent.proc.pid, signal.SIGCONT)

        def caught_up() -> bool:
            index = store.sample_index("pi-full")
            return bool(index) and index[-1][1] > refilled + 1 and agent_pending(store, "pi-full") == 0
        assert wait_until(caught_up, 30, interval=0.5), agent.log.read_text()[-3000:]
        assert agent.proc.poll() is None and "Traceback" not in agent.log.read_text()
        seqs = [seq for seq, _ in store.sample_index("pi-full")]
        assert seqs == list(range(1, seqs[-1] + 1))  # what was queued arrived, each once, no gap
        (row,) = [r for r in store.devices() if r.device_id == "pi-full"]
        assert row.telemetry["queue"]["dropped"] >= 5  # what the full disk lost is counted, not hidden
    finally:
        host.disconnect()
        broker.stop()


class _FullDiskIngest:
    """An Ingest whose database is on a small disk of its own, and a device that reports events:
    events are stored as they come, not deduplicated, so one stored twice would show. Its own
    broker: what other tests' devices report would be counted too."""

    def __init__(self, tmp_path, small_disk, caplog, **client_options) -> None:
        caplog.set_level(logging.WARNING, logger="host_tools.fleet.ingest")  # whatever an earlier test set
        (tmp_path / "broker").mkdir()
        self.broker = Mosquitto(tmp_path / "broker")
        self.broker.start()
        mosquitto = self.broker.address
        self.disk = small_disk(4)
        self.store = FleetStore(self.disk / "fleet.db")
        self.host = MqttClient(client_id=f"ingest-{time.time_ns()}", broker=mosquitto, **client_options)
        self.ingest = Ingest(self.host, self.store)
        self.ingest.start()
        self.host.connect()
        self.device = MqttClient(client_id=f"pi-held-{time.time_ns()}", broker=mosquitto)
        self.device.connect()

        sent: list[str] = []

        def listening() -> bool:  # the ingest's subscriptions are made as it connects, not waited for
            sent.append(f"probe {len(sent)}")
            status = DeviceStatus("pi-held", True, time.time(), agent_version=sent[-1])
            self.device.publish(topics.status("pi-held"), status.to_payload(), qos=1, wait=5)
            return any(r.device_id == "pi-held" for r in self.store.devices())
        assert wait_until(listening, 10, interval=0.2)
        # Every status sent on the way stored (they come in order): one still on its way when the disk
        # fills would be counted among the messages the ingest could not store.
        assert wait_until(lambda: [r.agent_version for r in self.store.devices()] == [sent[-1]], 10, 0.05)

    def report(self, n: int) -> None:
        from device_agent.protocol.reports import DeploymentEvent

        event = DeploymentEvent("pi-held", f"cmd-{n}", "downloading", "m 1.0.0", n / 100, f"event {n}", time.time())
        self.device.publish(topics.events("pi-held"), event.to_payload(), qos=1, wait=5)

    def report_to_a_full_disk(self, count: int):
        """Fill the disk, report *count* events and wait until the ingest has taken each, stored or
        not (the first may still fit in the database's log); returns the file that fills the disk."""
        filler = fill_disk(self.disk)
        for n in range(count):
            self.report(n)
        assert wait_until(lambda: self.ingest.unstored + len(self.stored()) == count, 10, 0.05), self.ingest.unstored
        return filler

    def stored(self) -> list[str]:
        return [e["reason"] for e in self.store.events("pi-held", ("downloading",))]

    def close(self) -> None:
        self.device.disconnect()
        self.host.disconnect()
        self.store.close()
        self.broker.stop()


def test_what_a_full_host_disk_held_back_is_stored_once_though_the_connection_broke_meanwhile(
        tmp_path, small_disk, caplog):
    """The monitor's way: held acknowledgements, a persistent session."""
    import host_tools.fleet.ingest as ingest_module

    fleet = _FullDiskIngest(tmp_path, small_disk, caplog, clean_session=False, held_acks=True)
    ingest, host = fleet.ingest, fleet.host
    try:
        filler = fleet.report_to_a_full_disk(10)
        held = ingest.unstored
        assert held >= 9
        connections = host.connections
        host.drop()  # what is held comes again from the broker over the new connection
        host.connect_in_background()
        assert wait_until(lambda: host.connections > connections, 10, 0.05)
        time.sleep(0.5)  # past the instant between the reconnect and the ingest forgetting what it held
        assert wait_until(lambda: ingest.unstored == held, 10, 0.05)
        filler.unlink()
        assert wait_until(lambda: ingest.unstored == 0, 3 * ingest_module.RETRY_INTERVAL + 5, 0.1)
        assert sorted(fleet.stored()) == [f"event {n}" for n in range(10)]
        assert caplog.text.count("cannot store what devices report") == 1, caplog.text
        assert f"storing again; the {held} message(s) from devices that waited are stored" in caplog.text
    finally:
        fleet.close()


def test_a_client_without_held_acknowledgements_drops_what_its_full_disk_cannot_take_and_says_how_much(
        tmp_path, small_disk, caplog):
    fleet = _FullDiskIngest(tmp_path, small_disk, caplog)
    ingest = fleet.ingest
    try:
        filler = fleet.report_to_a_full_disk(5)
        dropped, kept = ingest.unstored, fleet.stored()
        filler.unlink()
        fleet.report(5)
        assert wait_until(lambda: "event 5" in fleet.stored(), 10, 0.05)
        assert dropped >= 4 and fleet.stored() == [*kept, "event 5"]
        assert "dropping it until the database takes writes again" in caplog.text
        said = f"storing again; {dropped} message(s) from devices were dropped meanwhile"
        assert wait_until(lambda: said in caplog.text, 5, 0.05), caplog.text  # said just after it is stored
    finally:
        fleet.close()


def test_past_its_limit_of_held_messages_an_ingest_drops_and_counts_the_rest(tmp_path, small_disk, caplog,
                                                                           monkeypatch):
    """A broker whose in-flight window is larger than what the ingest keeps in memory (here the
    limit is lowered below Mosquitto's 20)."""
    import host_tools.fleet.ingest as ingest_module

    monkeypatch.setattr(ingest_module, "MAX_HELD", 3)
    fleet = _FullDiskIngest(tmp_path, small_disk, caplog, clean_session=False, held_acks=True)
    ingest = fleet.ingest
    try:
        filler = fleet.report_to_a_full_disk(10)
        dropped, kept = ingest.dropped, fleet.stored()
        assert dropped == ingest.unstored - 3
        filler.unlink()
        assert wait_until(lambda: ingest.unstored == 0, 3 * ingest_module.RETRY_INTERVAL + 5, 0.1)
        assert len(fleet.stored()) == len(kept) + 3
        assert f"storing again; {dropped} message(s) from devices were dropped meanwhile" in caplog.text
    finally:
        fleet.close()
