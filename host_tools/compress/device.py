"""Latency measured where the model will run: on a device, through the agent's benchmark command.

Each model is packaged as a throw-away bundle (signed with the operator's key, its first
evaluation sample as the sample input), fetched by the device, loaded and timed there
(`edgefleet bench` does the same for one bundle). Benchmarking never activates a bundle. The
original is timed first and again last, and its two medians averaged, so a device that warms up
or throttles during the series does not favour the candidates.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

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

    @property
    def where(self) -> str:
        return f"device {self.device} (the agent's benchmark command, original timed first and last)"

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
        return [Latency(float(np.mean([p for p, _ in medians[i]])), float(np.mean([q for _, q in medians[i]])),
                        self.runs * len(medians[i])) for i in range(len(models))]
