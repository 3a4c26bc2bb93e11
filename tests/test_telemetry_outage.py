"""Nothing lost: a real agent keeps measuring while the broker is gone (and through its own
restart), and the host ends up with every sample exactly once."""

from __future__ import annotations

import time

import pytest

from device_agent.mqtt import MqttClient
from host_tools.fleet.ingest import Ingest
from host_tools.fleet.store import FleetStore
from tests.conftest import Mosquitto, wait_until

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


def agent_pending(store: FleetStore) -> int:
    """What the newest sample says the agent still had queued when it was taken."""
    (row,) = [r for r in store.devices() if r.device_id == "pi-outage"]
    return (row.telemetry or {}).get("queue", {}).get("pending", 0)
