"""The fleet as Prometheus metrics: `/metrics` for an existing Prometheus/Grafana setup.

A custom collector reads the fleet database at scrape time, so the numbers are the newest
sample of each device, as `edgefleet fleet status` shows them. A reading a device did not send
(no power sensor, no thermal zone) has no series at all for that device: Prometheus gets no
number rather than a made-up zero.
"""

from __future__ import annotations

import threading
from decimal import Decimal
from typing import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from host_tools.fleet.store import FleetStore
from host_tools.fleet.view import summarize

# (metric name, help, summary field, the power of ten that scales it to the metric's unit)
GAUGES = [
    ("edgefleet_device_online", "1 if the device is connected, 0 if not.", "online", 0),
    ("edgefleet_inference_latency_p50_seconds", "Median inference latency over the last interval.",
     "latency_p50_ms", -3),
    ("edgefleet_inference_latency_p95_seconds", "95th percentile inference latency over the last interval.",
     "latency_p95_ms", -3),
    ("edgefleet_inference_latency_p99_seconds", "99th percentile inference latency over the last interval.",
     "latency_p99_ms", -3),
    ("edgefleet_inferences_per_second", "Inferences per second over the last interval.", "inferences_per_s", 0),
    ("edgefleet_process_resident_memory_bytes", "The agent process's RSS.", "process_rss_bytes", 0),
    ("edgefleet_process_cpu_percent", "The agent process's CPU, % of one core.", "process_cpu_percent", 0),
    ("edgefleet_temperature_celsius", "The device's hottest thermal zone.", "temperature_c", 0),
    ("edgefleet_power_watts", "Power as the device's sensor measures it (see the source label).",
     "power_watts", 0),
    ("edgefleet_energy_per_inference_joules", "Device energy over the interval per inference.",
     "energy_per_inference_mj", -3),
    ("edgefleet_disk_free_bytes", "Room left for the agent on the file system that holds its bundles.",
     "disk_free_bytes", 0),
    ("edgefleet_disk_size_bytes", "Size of the file system that holds the agent's bundles.", "disk_total_bytes", 0),
    ("edgefleet_last_seen_timestamp_seconds", "When the host last heard from the device (Unix time).",
     "last_seen", 0),
    ("edgefleet_client_certificate_expiry_timestamp_seconds",
     "When the client certificate the device shows the broker expires (Unix time).", "certificate_expires", 0),
    ("edgefleet_ca_certificate_expiry_timestamp_seconds",
     "When the last of the CA certificates the device trusts for its client certificate expires (Unix time).",
     "ca_certificate_expires", 0),
]


class FleetMetrics(Collector):
    def __init__(self, store: FleetStore) -> None:
        self._store = store

    def collect(self) -> Iterator:
        rows = [summarize(row) for row in self._store.devices()]
        for name, help_text, field, exponent in GAUGES:
            labels = ["device", "bundle"] + (["source"] if field == "power_watts" else [])
            family = GaugeMetricFamily(name, help_text, labels=labels)
            for s in rows:
                value = s[field]
                if value is None:
                    continue  # not reported by this device: no series, never a zero
                extra = [s["power_source"] or ""] if field == "power_watts" else []
                family.add_metric([s["device_id"], s["active_bundle"] or ""] + extra, scaled(value, exponent))
            yield family
        samples = CounterMetricFamily("edgefleet_telemetry_samples", "Telemetry samples stored for the device.",
                                      labels=["device"])
        for s in rows:
            samples.add_metric([s["device_id"]], s["telemetry_samples"])
        yield samples


def scaled(value: float, exponent: int) -> float:
    """*value* times ten to the *exponent*, as the decimal it is: 0.2559 ms is 0.0002559 s, where
    multiplying by 1e-3 gives 0.00025590000000000004."""
    value = float(value)
    return float(Decimal(repr(value)).scaleb(exponent)) if exponent else value


def serve_metrics(store: FleetStore, port: int, address: str = "0.0.0.0") -> threading.Thread:
    """Serve /metrics on *port* in a background thread; returns it."""
    from prometheus_client import start_http_server

    registry = CollectorRegistry()
    registry.register(FleetMetrics(store))
    server, thread = start_http_server(port, addr=address, registry=registry)
    return thread
