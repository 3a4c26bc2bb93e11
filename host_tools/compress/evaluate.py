"""Measure a model the way the accuracy guard compares them: size, host latency, accuracy."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from device_agent.errors import ConfigError
from device_agent.runtime import load_runtime


@dataclass(frozen=True)
class EvalData:
    inputs: np.ndarray
    labels: np.ndarray | None = None

    @classmethod
    def load(cls, path: Path) -> "EvalData":
        """An ``.npz`` with ``x`` (inputs) and optionally ``y`` (integer labels)."""
        try:
            with np.load(path, allow_pickle=False) as data:
                if "x" not in data.files:
                    raise ConfigError(f"{path}: evaluation data needs an array named 'x'")
                return cls(data["x"], data["y"] if "y" in data.files else None)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read evaluation data {path}: {exc}") from None


@dataclass(frozen=True)
class ModelReport:
    path: Path
    size_bytes: int
    latency_p50_ms: float
    latency_runs: int
    accuracy: float | None
    predictions: np.ndarray

    def as_metrics(self) -> dict:
        return {"size_bytes": self.size_bytes, "host_latency_p50_ms": round(self.latency_p50_ms, 4),
                "host_latency_runs": self.latency_runs, "batch": 1,
                "accuracy": None if self.accuracy is None else round(self.accuracy, 4)}


def evaluate_model(path: Path, data: EvalData, *, latency_runs: int = 200, warmup: int = 20) -> ModelReport:
    """Run *path* on all of *data* (batched) for accuracy, then time single-sample calls."""
    runtime = load_runtime("onnxruntime", path)
    name = runtime.inputs[0].name
    logits = runtime.run({name: data.inputs})[runtime.outputs[0].name]
    predictions = logits.argmax(axis=1)
    accuracy = float((predictions == data.labels).mean()) if data.labels is not None else None
    one = {name: data.inputs[:1]}
    for _ in range(warmup):
        runtime.run(one)
    times = []
    for i in range(latency_runs):
        feed = {name: data.inputs[i % len(data.inputs)][None]}
        start = time.perf_counter()
        runtime.run(feed)
        times.append(time.perf_counter() - start)
    return ModelReport(Path(path), Path(path).stat().st_size, float(np.median(times)) * 1e3,
                       latency_runs, accuracy, predictions)
