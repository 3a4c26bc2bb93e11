"""The fleet as rows: one summary per device, rendered as a rich table or JSON."""

from __future__ import annotations

import time
from typing import Any

from device_agent.protocol.reports import expires_at
from host_tools.fleet.store import DeviceRow

NA = "n/a"


def readings_summary(readings: dict[str, Any] | None) -> dict[str, Any]:
    """The numbers the views show, from one sample's readings; one the device did not send is
    None, never 0 — and so is one it sent that is not a number (the table, /metrics and the
    dashboard would fail on it)."""
    def part(name: str) -> dict[str, Any]:
        value = (readings or {}).get(name)
        return value if isinstance(value, dict) else {}

    def number(reading: dict[str, Any], key: str) -> int | float | None:
        value = reading.get(key)
        return value if type(value) in (int, float) else None
    inf, mem, cpu, power, thermal, disk = (part(n) for n in ("inference", "memory", "cpu", "power", "thermal", "disk"))
    source = power.get("source")
    return {
        "latency_p50_ms": number(inf, "p50_ms"),
        "latency_p95_ms": number(inf, "p95_ms"),
        "latency_p99_ms": number(inf, "p99_ms"),
        "inferences_per_s": number(inf, "per_s"),
        "process_rss_bytes": number(mem, "process_rss_bytes"),
        "process_cpu_percent": number(cpu, "process_percent"),
        "power_watts": number(power, "total_watts"),
        "power_source": source if isinstance(source, str) else None,
        "energy_per_inference_mj": number(inf, "energy_mj"),
        "temperature_c": number(thermal, "max_c"),
        "disk_free_bytes": number(disk, "free_bytes"),
        "disk_total_bytes": number(disk, "total_bytes"),
    }


def summarize(row: DeviceRow) -> dict[str, Any]:
    """A device's row: who and where it is, and its newest readings (readings_summary)."""
    return {
        "device_id": row.device_id,
        "labels": row.labels,
        "online": row.online,
        "since": row.since,
        "active_bundle": row.active_bundle,
        **readings_summary(row.telemetry),
        "telemetry_samples": row.samples,
        "last_seen": row.last_seen or None,
        "certificate_expires": expires_at(row.certificate),
        "ca_certificate_expires": expires_at(row.certificate, "ca_expires"),
    }


def matching(rows: list[DeviceRow], selectors: list[str]) -> list[DeviceRow]:
    """The rows whose labels match every NAME=VALUE selector."""
    wanted = []
    for selector in selectors:
        name, sep, value = selector.partition("=")
        if not sep or not name:
            raise ValueError(f"a label selector is NAME=VALUE, not {selector!r}")
        wanted.append((name, value))
    return [r for r in rows if all(r.labels.get(name) == value for name, value in wanted)]


def _num(value: Any, fmt: str) -> str:
    return NA if value is None else format(value, fmt)


def ago(ts: float | None, now: float) -> str:
    if not ts:
        return NA
    s = max(0, int(now - ts))
    return f"{s}s ago" if s < 120 else f"{s // 60}m ago" if s < 7200 else f"{s // 3600}h ago"


def fleet_table(rows: list[DeviceRow], now: float | None = None):
    from rich.table import Table

    now = time.time() if now is None else now
    table = Table(title="fleet status", header_style="bold", caption="latency in ms over the last "
                  "telemetry interval; RSS in MiB; CPU in % of one core; °C: hottest zone; power: what the device's "
                  "sensor measures (source in brackets); n/a = not reported by the device")
    # a bundle label wraps only past 40 characters: "name version" split over two lines misleads
    bundle_width = min(40, max((len(r.active_bundle or "") for r in rows), default=0))
    for header in ("device", "state", "bundle", "p50", "p95", "p99", "inf/s", "RSS", "CPU", "°C", "power W", "seen"):
        table.add_column(header, justify="left" if header in ("device", "state", "bundle") else "right",
                         no_wrap=header != "bundle", min_width=bundle_width if header == "bundle" else None)
    for row in rows:
        s = summarize(row)
        state = "[green]online[/]" if s["online"] else f"[red]offline[/] {ago(s['since'], now)}"
        rss = s["process_rss_bytes"]
        power = _num(s["power_watts"], ".2f")
        if s["power_source"]:
            power += f" ({s['power_source']})"
        table.add_row(s["device_id"], state, s["active_bundle"] or "none",
                      _num(s["latency_p50_ms"], ".3f"), _num(s["latency_p95_ms"], ".3f"),
                      _num(s["latency_p99_ms"], ".3f"), _num(s["inferences_per_s"], ".1f"),
                      NA if rss is None else f"{rss / 2**20:.1f}", _num(s["process_cpu_percent"], ".1f"),
                      _num(s["temperature_c"], ".1f"), power, ago(s["last_seen"], now))
    return table
