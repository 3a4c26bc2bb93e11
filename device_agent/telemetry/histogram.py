"""A fixed-size latency histogram: log-spaced buckets, constant memory, ~2% resolution."""

from __future__ import annotations

import math
import threading

import numpy as np

_MIN_S = 1e-6          # 1 µs
_MAX_S = 100.0         # 100 s; anything slower lands in the last bucket
_GROWTH = 1.02
_BUCKETS = int(math.ceil(math.log(_MAX_S / _MIN_S) / math.log(_GROWTH))) + 1
_UPPER = _MIN_S * _GROWTH ** np.arange(1, _BUCKETS + 1)  # upper bound of each bucket


class LatencyHistogram:
    """Thread-safe: inference threads record, the telemetry thread snapshots and resets."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # One part per model version that served requests this interval (two around a swap; None
        # for requests with no version); the interval's whole distribution is their sum.
        self._parts: dict[str | None, list] = {}

    def record(self, seconds: float, version: str | None = None) -> None:
        index = 0 if seconds <= _MIN_S else min(_BUCKETS - 1, int(math.log(seconds / _MIN_S) / math.log(_GROWTH)))
        with self._lock:
            part = self._parts.get(version)
            if part is None:
                part = self._parts[version] = [np.zeros(_BUCKETS, dtype=np.int64), 0.0, 0.0]  # counts, max, sum
            part[0][index] += 1
            part[1] = max(part[1], seconds)
            part[2] += seconds

    def snapshot_and_reset(self) -> "HistogramSnapshot":
        with self._lock:
            parts, self._parts = self._parts, {}
        counts = [c for c, _, _ in parts.values()]
        snap = HistogramSnapshot(counts[0] if len(counts) == 1 else sum(counts, np.zeros(_BUCKETS, dtype=np.int64)),
                                 max((m for _, m, _ in parts.values()), default=0.0),
                                 sum(t for _, _, t in parts.values()))
        snap.by_version = {v: HistogramSnapshot(c, m, t) for v, (c, m, t) in parts.items() if v is not None}
        return snap


class HistogramSnapshot:
    def __init__(self, counts: np.ndarray, max_s: float, sum_s: float) -> None:
        self.by_version: dict[str, "HistogramSnapshot"] = {}
        self.counts = counts
        self.count = int(counts.sum())
        self.max_s = max_s
        self.mean_s = sum_s / self.count if self.count else None
        self._cumulative: np.ndarray | None = None  # made once, for all the percentiles asked of it

    def percentile(self, q: float) -> float | None:
        """Upper bound of the bucket holding the q-th percentile, never above the observed max;
        the overflow bucket has no upper bound, so it reports the max itself."""
        if self.count == 0:
            return None
        rank = max(1, math.ceil(q / 100.0 * self.count))
        if self._cumulative is None:
            self._cumulative = np.cumsum(self.counts)
        index = int(np.searchsorted(self._cumulative, rank))
        if index == _BUCKETS - 1:
            return self.max_s
        return float(min(_UPPER[index], self.max_s))
