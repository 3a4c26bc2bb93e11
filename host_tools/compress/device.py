"""Latency measured where the model will run: on a device, through the agent's benchmark command.

Each model is packaged as a throw-away bundle (signed with the operator's key, its first
evaluation sample as the sample input), fetched by the device, loaded and timed there
(`edgefleet bench` does the same for one bundle). Benchmarking never activates a bundle. Every
model is timed in each of a few interleaved rounds (the device keeps the bundles it fetched, so
only the first round downloads), each round starting one model further on, and a model's latency
is the median of its rounds': a board that warms up, throttles or gets busy during the series
spreads that over every model alike rather than favouring the ones timed last. Where the
original's rounds differ by more than DRIFT, the report says so beside the latencies, which are
that uncertain.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from device_agent.bench import duration
from device_agent.errors import CompressionError
from device_agent.protocol.chunks import DEFAULT_CHUNK_SIZE
from host_tools.compress.data import BoundData
from host_tools.compress.evaluate import Latency
from host_tools.compress.model import ModelFile


@dataclass
class DeviceBench:
    client: object  # a connected MqttClient
    device: str
    key: Path  # private signing key the device trusts
    signer: object  # CommandSigner
    runs: int = 100  # per model, over all rounds (at least)
    warmup: int = 10
    timeout: float = 300.0
    chunk_size: int = DEFAULT_CHUNK_SIZE
    rounds: int = 3
    drift: str = field(default="", init=False)  # the last series': drifted()

    @property
    def where(self) -> str:
        return (f"device {self.device} (the agent's benchmark command, the median of {self.rounds} interleaved "
                f"rounds{self.drift})")

    def __call__(self, models: list[ModelFile], data: BoundData, say: Callable[[str], None]) -> list[Latency]:
        from host_tools.ask import bench_bundle
        from host_tools.packaging import build_bundle

        runs = -(-self.runs // self.rounds)
        medians: list[list[tuple[float, float]]] = [[] for _ in models]  # (p50, p90) of each round
        with tempfile.TemporaryDirectory(prefix="edgefleet-devbench-") as tmp:
            bundles = [Path(tmp) / f"model-{i}.efb" for i in range(len(models))]
            for i, (model, bundle) in enumerate(zip(models, bundles)):
                build_bundle(model.path, name=f"bench-{model.path.stem}"[:60], version=f"0.0.{i}", key=self.key,
                             out=bundle, sample=data.sample(0))
            for r in range(self.rounds):
                for i in [*range(r % len(models), len(models)), *range(r % len(models))]:
                    say(f"timing {models[i].path.name} on {self.device} (round {r + 1}/{self.rounds}, {runs} runs)")
                    reply = bench_bundle(self.client, self.device, bundles[i], runs=runs, warmup=self.warmup,
                                         timeout=self.timeout, signer=self.signer, chunk_size=self.chunk_size)
                    if not reply.ok:
                        raise CompressionError(f"{self.device} could not benchmark {models[i].path.name}: "
                                               f"{reply.error}")
                    medians[i].append((reply.body["p50_ms"], reply.body["p90_ms"]))
        self.drift = drifted([p50 for p50, _ in medians[0]])
        return [Latency(float(np.median([p for p, _ in m])), float(np.median([q for _, q in m])), runs * len(m))
                for m in medians]


DRIFT = 1.2  # the original's rounds further apart than this: the device's speed changed


def drifted(original_ms: list[float]) -> str:
    """What the report says of the original's p50 in each round of a series: nothing where they
    agree within DRIFT, else how far apart they were, as the uncertainty of every ratio (a device
    that throttled, or got busy with something else, while the series ran)."""
    low, high = min(original_ms), max(original_ms)
    if high <= low * DRIFT:
        return ""
    return (f"; the original's ranged from {duration(low)} to {duration(high)}, {high / low:.2f}x apart: the device's "
            f"speed changed during the series, and the ratios are that uncertain")
