"""Collectors report what they measured; a broken one is reported, not fatal; no sensor, no field."""

import time

from device_agent.telemetry import REGISTRY, CollectorContext, TelemetryCollectors, register
from device_agent.telemetry.histogram import LatencyHistogram


def test_default_collectors_report_real_process_readings():
    hist = LatencyHistogram()
    for _ in range(10):
        hist.record(0.002)
    readings = TelemetryCollectors(CollectorContext(latency=hist)).collect()
    assert readings["inference"]["count"] == 10
    assert abs(readings["inference"]["p50_ms"] - 2.0) < 0.05
    assert readings["memory"]["process_rss_bytes"] > 10 * 2**20
    assert 0 < readings["memory"]["system_available_bytes"] <= readings["memory"]["system_total_bytes"]
    assert readings["cpu"]["cores"] >= 1
    assert all(h["ok"] for h in readings["collectors"].values())
    assert "power" not in readings  # this machine has no power sensor: absent, never zero


def test_the_disk_collector_reports_the_room_left_where_the_agent_keeps_its_bundles(small_disk):
    state_dir = small_disk(4)
    collectors = TelemetryCollectors(CollectorContext(state_dir=state_dir), ["disk"])
    assert collectors.collect()["disk"] == {"free_bytes": 4 * 2**20, "total_bytes": 4 * 2**20}
    (state_dir / "bundle").write_bytes(b"\x01" * 3 * 2**20)
    assert collectors.collect()["disk"] == {"free_bytes": 2**20, "total_bytes": 4 * 2**20}
    # run on its own, without a state directory, it has nothing to read: no reading at all
    assert "disk" not in TelemetryCollectors(CollectorContext(), ["disk"]).collect()


def test_the_latency_distribution_over_an_interval_has_its_percentiles_and_max():
    hist = LatencyHistogram()
    for ms in range(1, 101):  # 1 ms .. 100 ms, one each
        hist.record(ms / 1000)
    inf = TelemetryCollectors(CollectorContext(latency=hist), ["inference"]).collect()["inference"]
    for name, want in (("p50_ms", 50), ("p90_ms", 90), ("p99_ms", 99), ("max_ms", 100)):
        assert abs(inf[name] - want) <= want * 0.021, (name, inf[name])  # the histogram's 2% buckets


def test_an_interval_with_a_swap_reports_each_versions_latency_on_its_own():
    hist = LatencyHistogram()
    for _ in range(30):
        hist.record(0.002, "m 1.0.0")
    for _ in range(10):
        hist.record(0.010, "m 2.0.0")
    inf = TelemetryCollectors(CollectorContext(latency=hist), ["inference"]).collect()["inference"]
    assert inf["count"] == 40
    assert inf["versions"]["m 1.0.0"]["count"] == 30 and abs(inf["versions"]["m 1.0.0"]["p99_ms"] - 2.0) < 0.05
    assert inf["versions"]["m 2.0.0"]["count"] == 10 and abs(inf["versions"]["m 2.0.0"]["p50_ms"] - 10.0) < 0.2
    hist.record(0.003, "m 2.0.0")  # one version only: no breakdown needed
    assert "versions" not in TelemetryCollectors(CollectorContext(latency=hist), ["inference"]).collect()["inference"]


def test_an_idle_interval_reports_zero_inferences_and_no_latency():
    readings = TelemetryCollectors(CollectorContext(), ["inference"]).collect()
    assert readings["inference"]["count"] == 0
    assert readings["inference"]["p50_ms"] is None


def test_a_failing_collector_is_reported_and_the_others_still_run():
    @register("broken_sensor", default=False)
    class Broken:
        def __init__(self, ctx):
            pass

        def collect(self):
            raise OSError("i2c bus error")
    try:
        start = time.monotonic()
        readings = TelemetryCollectors(CollectorContext(), ["broken_sensor", "memory"]).collect()
        assert time.monotonic() - start < 5
        assert readings["collectors"]["broken_sensor"]["ok"] is False
        assert "broken_sensor" not in readings
        assert readings["memory"]["process_rss_bytes"] > 0
    finally:
        del REGISTRY["broken_sensor"]
