"""The active model on a device: one slot that inference goes through and that a deployment swaps."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict
from typing import Any, Mapping

import numpy as np

from device_agent.errors import ModelError
from device_agent.runtime import ModelRuntime
from device_agent.store import InstalledBundle
from device_agent.telemetry.histogram import LatencyHistogram

log = logging.getLogger(__name__)


class ModelSlot:
    """Holds the active (bundle, runtime) pair; a swap never interrupts a running call."""

    def __init__(self, latency: LatencyHistogram) -> None:
        self._lock = threading.Lock()
        self._bundle: InstalledBundle | None = None
        self._runtime: ModelRuntime | None = None
        self._sample: dict[str, np.ndarray] = {}
        self._latency = latency
        self.errors = 0

    @property
    def bundle(self) -> InstalledBundle | None:
        return self._bundle

    def swap(self, bundle: InstalledBundle, runtime: ModelRuntime, sample: dict[str, np.ndarray]) -> None:
        with self._lock:
            self._bundle, self._runtime, self._sample = bundle, runtime, sample

    def clear(self) -> None:
        with self._lock:
            self._bundle, self._runtime, self._sample = None, None, {}

    def describe(self) -> dict[str, Any]:
        with self._lock:
            bundle, runtime = self._bundle, self._runtime
        if bundle is None or runtime is None:
            return {"bundle": None, "sha256": None, "runtime": None, "inputs": [], "outputs": []}
        return {"bundle": bundle.label, "sha256": bundle.sha256, "runtime": runtime.name,
                "inputs": [asdict(s) for s in runtime.inputs], "outputs": [asdict(s) for s in runtime.outputs]}

    def infer(self, feeds: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Run the active model (on its sample input when *feeds* is None) and record the latency."""
        with self._lock:
            runtime, sample, bundle = self._runtime, self._sample, self._bundle
        return self._run(runtime, sample if feeds is None else feeds, bundle)

    def infer_request(self, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        """Run a local API request: bind *inputs* to the model that is active now, and run that model."""
        with self._lock:
            runtime, bundle = self._runtime, self._bundle
        if runtime is None:
            raise ModelError("no model is active on this device")
        return self._run(runtime, as_feeds(inputs, runtime.inputs), bundle)

    def _run(self, runtime: ModelRuntime | None, feeds: Mapping[str, np.ndarray],
             bundle: InstalledBundle | None = None) -> dict[str, np.ndarray]:
        # The runtime was taken under the lock; a swap now does not affect this call, which
        # finishes on the model it started with.
        if runtime is None:
            raise ModelError("no model is active on this device")
        start = time.perf_counter()
        try:
            out = runtime.run(feeds)
        except ModelError:
            self.errors += 1
            raise
        self._latency.record(time.perf_counter() - start, bundle.label if bundle is not None else None)
        return out


def as_feeds(inputs: dict[str, Any], specs) -> dict[str, np.ndarray]:
    """Bind decoded request arrays to the model's inputs, casting JSON lists to the declared dtype."""
    if len(inputs) == len(specs) and all(isinstance(inputs.get(s.name), np.ndarray) for s in specs):
        return inputs  # the common case: arrays named as the model names them
    if set(inputs) == {""}:
        if len(specs) != 1:
            raise ModelError(f"a bare .npy fits a model with one input; this one takes "
                             f"{', '.join(s.name for s in specs)}")
        inputs = {specs[0].name: inputs[""]}
    missing = [s.name for s in specs if s.name not in inputs]
    if missing:
        raise ModelError(f"missing input(s) {', '.join(missing)}")
    feeds = {}
    for spec in specs:
        value = inputs[spec.name]
        if not isinstance(value, np.ndarray):
            try:
                value = np.asarray(value, dtype=spec.dtype)
            except (ValueError, TypeError) as exc:
                raise ModelError(f"input {spec.name!r} is not a {spec.dtype} array: {exc}") from None
        feeds[spec.name] = value
    return feeds


class SampleWorkload(threading.Thread):
    """Runs the active model on its sample input at a fixed interval."""

    def __init__(self, slot: ModelSlot, interval: float, stop: threading.Event) -> None:
        super().__init__(name="sample-workload", daemon=True)
        self._slot, self._interval, self._stop = slot, interval, stop

    def run(self) -> None:
        while not self._stop.wait(self._interval):
            if self._slot.bundle is None:
                continue
            try:
                self._slot.infer()
            except ModelError as exc:
                log.warning("inference failed: %s", exc)
