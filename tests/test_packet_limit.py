"""A broker with a small packet limit, as managed brokers have: told the chunk size, rollouts and
benchmarks on a device fit their transfers under it; not told, deploy, rollout, bench and compress
--device say so in one line, before anything is sent."""

from __future__ import annotations

import json

import pytest

from device_agent.errors import MqttError
from device_agent.mqtt import MqttClient
from host_tools.fleet.store import FleetStore
from host_tools.packet_limit import check_broker_passes_chunks
from tests.conftest import MODELS, Mosquitto, edgefleet, wait_until

LIMIT = 24 * 1024  # bytes per MQTT packet; the default 64 KiB chunks do not fit
DEVICES = ["lim-0", "lim-1"]


@pytest.fixture
def mosquitto(tmp_path):
    """This module's broker (the agents and monitor fixtures use it): Mosquitto refusing packets over LIMIT."""
    (tmp_path / "broker").mkdir()
    broker = Mosquitto(tmp_path / "broker", extra_conf=f"max_packet_size {LIMIT}\n")
    broker.start()
    yield broker.address
    broker.stop()


def rollout(monitor, mosquitto, bundle, *extra):
    return edgefleet("rollout", "start", bundle, *[a for d in DEVICES for a in ("--device", d)], "--db", monitor,
                     "--broker", mosquitto, "--stages", "50,100", "--window", "0", "--json", *extra, timeout=300)


def test_chunks_under_the_brokers_packet_limit_reach_devices_in_rollouts_and_benchmarks(agents, monitor, mosquitto,
                                                                                         make_bundle, keys, tmp_path):
    bundle = make_bundle("1.0.0")
    assert bundle.stat().st_size > 4 * LIMIT  # several chunks, not one small message
    for device in DEVICES:
        agents.start(device, telemetry_interval=0.5)
    store = FleetStore(monitor)
    assert wait_until(lambda: {r.device_id for r in store.devices() if r.online} >= set(DEVICES), 30)
    result = rollout(monitor, mosquitto, bundle, "--chunk-size", str(16 * 1024), "--stage-timeout", "60")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["state"] == "done" and {d["device_id"]: d["state"] for d in doc["devices"]} == \
        {d: "active" for d in DEVICES}, result.stderr
    assert json.loads(edgefleet("rollout", "status", doc["rollout_id"], "--db", monitor, "--json").stdout)["plan"][
        "chunk_size"] == 16 * 1024  # kept with the rollout: `rollout resume` offers the same chunks

    # The commands that send a bundle to time it on a device: with smaller chunks it works, without, one line.
    bench = edgefleet("bench", make_bundle("2.0.0"), "--device", "lim-0", "--broker", mosquitto, "--runs", 5,
                      "--chunk-size", 16 * 1024, "--json")
    assert bench.returncode == 0 and json.loads(bench.stdout)["p50_ms"] > 0, bench.stderr
    compress = ("compress", MODELS / "digits_cnn.onnx", "--recipe", "int8-dynamic", "--eval",
                MODELS / "digits_heldout.npz", "-o", tmp_path / "x.onnx", "--device", "lim-0", "--broker", mosquitto,
                "--key", keys["key"], "--latency-runs", 10)
    result = edgefleet(*compress)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith("is its packet limit smaller? use a smaller --chunk-size")
    assert "evaluating" not in result.stderr and not (tmp_path / "x.onnx").exists()  # before compressing anything
    result = edgefleet(*compress, "--chunk-size", 16 * 1024, "--json", timeout=300)
    assert result.returncode == 0 and "device lim-0" in json.loads(result.stdout)["latency_method"], result.stderr


def test_rollout_refuses_a_chunk_size_outside_what_devices_accept(monitor, mosquitto, make_bundle):
    for size in ("512", str(2 << 20)):
        result = rollout(monitor, mosquitto, make_bundle("1.0.0"), "--chunk-size", size)
        assert result.returncode == 2 and "--chunk-size" in result.stderr and "Traceback" not in result.stderr


def test_chunks_too_large_for_the_broker_are_one_clear_error_before_anything_is_sent(monitor, mosquitto, make_bundle):
    bundle = make_bundle("1.0.0")
    deploy = edgefleet("deploy", bundle, "--device", "lim-0", "--broker", mosquitto, "--timeout", "60")
    bench = edgefleet("bench", bundle, "--device", "lim-0", "--broker", mosquitto, "--json")
    rollout_start = rollout(monitor, mosquitto, bundle)
    for result in (deploy, bench, rollout_start):
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert "is its packet limit smaller? use a smaller --chunk-size" in line
    assert json.loads(edgefleet("rollout", "list", "--db", monitor, "--json").stdout) == []  # none was started


def test_a_broker_that_drops_large_messages_is_found_out(tmp_path):
    broker = Mosquitto(tmp_path, extra_conf=f"message_size_limit {LIMIT}\n")  # drops them, connection stays
    broker.start()
    client = MqttClient(client_id="probe", broker=broker.address)
    client.connect()
    try:
        check_broker_passes_chunks(client, 16 * 1024, timeout=5)  # fits
        with pytest.raises(MqttError, match="did not pass on a 65.*-byte message within 2s"):
            check_broker_passes_chunks(client, 64 * 1024, timeout=2)
        assert client.connected
    finally:
        client.disconnect()
        broker.stop()
