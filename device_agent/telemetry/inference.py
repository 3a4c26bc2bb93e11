"""Inference latency and throughput over the last interval, from the agent's histogram."""

from __future__ import annotations

import time
from typing import Any

from device_agent.telemetry import CollectorContext, register


@register("inference")
class InferenceCollector:
    def __init__(self, context: CollectorContext) -> None:
        self._histogram = context.latency
        self._errors = context.errors
        self._last = time.monotonic()
        self._last_errors = context.errors()

    def collect(self) -> dict[str, Any]:
        now = time.monotonic()
        snap = self._histogram.snapshot_and_reset()
        errors = self._errors()
        elapsed, self._last = now - self._last, now
        new_errors, self._last_errors = errors - self._last_errors, errors
        out = {"count": snap.count, "errors": new_errors,
               "per_s": round(snap.count / elapsed, 3) if elapsed > 0 else None, **_distribution(snap)}
        if len(snap.by_version) > 1:  # a swap this interval: each version's own distribution
            out["versions"] = {v: {"count": s.count, **_distribution(s)} for v, s in sorted(snap.by_version.items())}
        return out


def _distribution(snap) -> dict[str, Any]:
    ms = lambda s: None if s is None else round(s * 1e3, 4)  # noqa: E731
    return {"p50_ms": ms(snap.percentile(50)), "p90_ms": ms(snap.percentile(90)),
            "p95_ms": ms(snap.percentile(95)), "p99_ms": ms(snap.percentile(99)),
            "max_ms": ms(snap.max_s if snap.count else None)}
