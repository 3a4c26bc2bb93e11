"""Latency measured where the model will run: on a device, through the agent's benchmark command.

Each model is packaged as a throw-away bundle (signed with the operator's key, its first
evaluation sample as the sample input), fetched by the device, loaded and timed there
(`edgefleet bench` does the same for one bundle). Benchmarking never activates a bundle. The
original is timed first and again last, and its two medians averaged, so a device that warms up
or throttles during the series does not favour the candidates; where the two differ by more than
DRIFT, the report says so beside the latencies, which are that uncertain.
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
    runs: int = 100
    warmup: int = 10
    timeout: float = 300.0
    chunk_size: int = DEFAULT_CHUNK_SIZE
    drift: str = field(default="", init=False)  # the last series': drifted()

    @property
    def where(self) -> str:
        return f"device {self.device} (the agent's benchmark command, original timed first and last{self.drift})"

    def __call__(self, models: list[ModelFile], data: BoundData, say: Callable[[str], None]) -> list[Latency]:
        from host_tools.ask import bench_bundle
        from host_tools.packaging import build_bundle

        medians: dict[int, list[tuple[float, float]]] = {}
        with tempfile.TemporaryDirectory(prefix="edgefleet-devbench-") as tmp:
            for i in list(range(len(models))) + [0]:
                bundle = Path(tmp) / f"model-{i}.efb"
                if not bundle.exists():
                    build_bundle(models[i].path, name=f"bench-{models[i].path.stem}"[:60], version=f"0.0.{i}",
                                 key=self.key, out=bundle, sample=data.sample(0))
                say(f"timing {models[i].path.name} on {self.device} ({self.runs} runs)")
                reply = bench_bundle(self.client, self.device, bundle, runs=self.runs, warmup=self.warmup,
                                     timeout=self.timeout, signer=self.signer, chunk_size=self.chunk_size)
                if not reply.ok:
                    raise CompressionError(f"{self.device} could not benchmark {models[i].path.name}: {reply.error}")
                medians.setdefault(i, []).append((reply.body["p50_ms"], reply.body["p90_ms"]))
        self.drift = drifted(medians[0][0][0], medians[0][-1][0])
        return [Latency(float(np.mean([p for p, _ in medians[i]])), float(np.mean([q for _, q in medians[i]])),
                        self.runs * len(medians[i])) for i in range(len(models))]


DRIFT = 1.2  # the original's first and last p50 further apart than this: the device's speed changed


def drifted(first_ms: float, last_ms: float) -> str:
    """What the report says of the original's p50 at the start of a series (*first_ms*) and at its
    end: nothing where the two agree within DRIFT, else both, as the uncertainty of every ratio (a
    device that throttled, or got busy with something else, while the series ran)."""
    low, high = sorted((first_ms, last_ms))
    if high <= low * DRIFT:
        return ""
    return (f": {duration(first_ms)} and {duration(last_ms)}, {high / low:.2f}x apart, so the device's speed changed "
            f"during the series and the ratios are that uncertain")
