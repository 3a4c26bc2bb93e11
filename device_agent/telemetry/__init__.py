"""Device telemetry: one module per collector, each registering itself by name.

A collector has a ``name``, whether it is on ``by default``, and one
``collect()`` method returning a dict of readings, or None when the device has
nothing to read (no sensor: the reading is absent, never zero). Every
collector is timed, and a collector that raises is reported as failed in the
sample instead of taking the agent down.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from device_agent.telemetry.histogram import LatencyHistogram

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CollectorContext:
    """What collectors may read: filesystem roots (fixture trees in tests) and agent state."""

    sysfs: Path = Path("/sys")
    procfs: Path = Path("/proc")
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    errors: Callable[[], int] = lambda: 0
    # Runs `vcgencmd ARGS` and returns its output, None where there is none (tests: recorded output).
    vcgencmd: Callable[..., str | None] = field(default_factory=lambda: _real_vcgencmd)
    clock: Callable[[], float] = time.monotonic
    state_dir: Path | None = None  # where the agent keeps its bundles (the disk collector's file system)


def _real_vcgencmd(*args: str) -> str | None:
    from device_agent.telemetry.power import run_vcgencmd

    return run_vcgencmd(*args)


class Collector(Protocol):
    name: str

    def collect(self) -> dict[str, Any] | None: ...


@dataclass(frozen=True)
class CollectorInfo:
    name: str
    enabled_by_default: bool
    factory: Callable[[CollectorContext], Collector]


REGISTRY: dict[str, CollectorInfo] = {}


def register(name: str, *, default: bool = True):
    def wrap(cls):
        cls.name = name
        REGISTRY[name] = CollectorInfo(name, default, cls)
        return cls
    return wrap


class TelemetryCollectors:
    """Runs the enabled collectors and gathers one interval's readings."""

    def __init__(self, context: CollectorContext, names: list[str] | None = None) -> None:
        _load_builtin()
        chosen = names if names is not None else [n for n, c in REGISTRY.items() if c.enabled_by_default]
        unknown = [n for n in chosen if n not in REGISTRY]
        if unknown:
            raise ValueError(f"unknown telemetry collectors: {', '.join(unknown)}")
        self._collectors = [REGISTRY[n].factory(context) for n in chosen]

    def collect(self) -> dict[str, Any]:
        readings: dict[str, Any] = {}
        health: dict[str, Any] = {}
        for collector in self._collectors:
            start = time.perf_counter()
            try:
                value = collector.collect()
                ok = True
            except Exception as exc:  # a broken sensor is data, not a crash
                log.warning("collector %s failed: %s", collector.name, exc)
                value, ok = None, False
            health[collector.name] = {"ok": ok, "duration_ms": round((time.perf_counter() - start) * 1e3, 3)}
            if value is not None:
                readings[collector.name] = value
        readings["collectors"] = health
        _energy_per_inference(readings)
        return readings


def _energy_per_inference(readings: dict[str, Any]) -> None:
    """Where power is measured: the board's (or SoC's) energy over the interval per inference, in
    mJ. All of it is charged to inference; it is what a deployment costs, idle draw included."""
    watts = (readings.get("power") or {}).get("total_watts")
    per_s = (readings.get("inference") or {}).get("per_s")
    if watts is not None and per_s:
        readings["inference"]["energy_mj"] = round(watts / per_s * 1000, 3)


def _load_builtin() -> None:
    # Importing a collector module registers it.
    from device_agent.telemetry import cpu, disk, inference, memory, power, thermal  # noqa: F401
