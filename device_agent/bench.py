"""Benchmark a bundle's model on this device, like TFLite's benchmark_model.

Reports load time, first-inference time, warm latency percentiles over N runs
after a warm-up, and memory, each measured here with a monotonic clock.
"""

from __future__ import annotations

import resource
import statistics
import time
from typing import Any

import numpy as np
import psutil

from device_agent.runtime import RuntimeOptions, load_runtime
from device_agent.sample import load_sample
from device_agent.store import InstalledBundle

# The timings a benchmark's result holds, (label, key) in the order both CLIs print them.
TIMINGS = (("load", "load_ms"), ("first inference", "first_inference_ms"), ("p50", "p50_ms"), ("p90", "p90_ms"),
           ("p99", "p99_ms"), ("mean", "mean_ms"))


def duration(ms: float) -> str:
    """*ms* in the unit it reads best in, to three or four figures: 15.2 µs (not 0.015 ms), 1.991 ms,
    812.3 ms."""
    if ms < 1:
        return f"{ms * 1000:.1f} µs"
    return f"{ms:.3f} ms" if ms < 10 else f"{ms:.1f} ms"


def benchmark(bundle: InstalledBundle, options: RuntimeOptions, *, runs: int = 100, warmup: int = 10,
              on_progress=None) -> dict[str, Any]:
    """Time *bundle*'s model on its sample input. Latencies in ms, memory in bytes."""
    process = psutil.Process()
    rss_before = process.memory_info().rss
    start = time.perf_counter()
    runtime = load_runtime(bundle.manifest.runtime, bundle.files / bundle.manifest.model_file, options)
    load_ms = (time.perf_counter() - start) * 1e3
    feeds, _ = load_sample(bundle.files / bundle.manifest.sample.file)
    start = time.perf_counter()
    runtime.run(feeds)
    first_ms = (time.perf_counter() - start) * 1e3
    for _ in range(warmup):
        runtime.run(feeds)
    timings = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter()
        runtime.run(feeds)
        timings[i] = (time.perf_counter() - start) * 1e3
        if on_progress is not None and (i + 1) % max(1, runs // 10) == 0:
            on_progress((i + 1) / runs)
    rss_after = process.memory_info().rss
    p50, p90, p99 = np.percentile(timings, [50, 90, 99])
    return {
        "bundle": bundle.label, "sha256": bundle.sha256, "runtime": runtime.name,
        "providers": list(getattr(runtime, "providers", ())), "threads": options.threads,
        "runs": runs, "warmup": warmup,
        "load_ms": round(load_ms, 3), "first_inference_ms": round(first_ms, 3),
        "p50_ms": round(float(p50), 4), "p90_ms": round(float(p90), 4), "p99_ms": round(float(p99), 4),
        "mean_ms": round(statistics.fmean(timings), 4), "min_ms": round(float(timings.min()), 4),
        "rss_before_load_bytes": rss_before, "rss_after_runs_bytes": rss_after,
        # ru_maxrss is the process's high-water mark in KiB (Linux), since the process started
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
