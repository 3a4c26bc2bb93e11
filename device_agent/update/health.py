"""The health check a bundle passes before it is committed.

The model is loaded, run on the bundle's sample input, and its output compared
with the expected output within the manifest's tolerance; when the manifest
sets a latency budget, the median of a few timed runs must meet it. Each way
of failing raises with its own reason, which the host sees.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from device_agent.errors import HealthCheckError, ModelError
from device_agent.runtime import ModelRuntime, RuntimeOptions, load_runtime
from device_agent.sample import check_sample
from device_agent.store import InstalledBundle

BUDGET_RUNS = 7


def health_check(bundle: InstalledBundle, options: RuntimeOptions) -> tuple[ModelRuntime, dict[str, np.ndarray]]:
    """Load and check *bundle*'s model; returns the loaded runtime and its sample input."""
    manifest = bundle.manifest
    try:
        runtime = load_runtime(manifest.runtime, bundle.files / manifest.model_file, options)
    except ModelError as exc:
        raise ModelError(f"model does not load: {exc}") from None
    sample = check_sample(runtime, manifest, bundle.files)
    budget = manifest.sample.latency_budget_ms
    if budget is not None:
        timings = []
        for _ in range(BUDGET_RUNS):
            start = time.perf_counter()
            runtime.run(sample)
            timings.append((time.perf_counter() - start) * 1e3)
        median = statistics.median(timings)
        if median > budget:
            raise HealthCheckError(f"too slow: median {median:.3f} ms over {BUDGET_RUNS} runs of the sample "
                                   f"exceeds the {budget:g} ms latency budget")
    return runtime, sample
