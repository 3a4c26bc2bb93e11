"""The one small interface every model runtime implements."""

from __future__ import annotations

from typing import Mapping, Protocol

import numpy as np

from device_agent.bundle.manifest import TensorSpec


class ModelRuntime(Protocol):
    """A loaded model: what it takes, what it gives, and a way to run it."""

    name: str

    @property
    def inputs(self) -> tuple[TensorSpec, ...]: ...

    @property
    def outputs(self) -> tuple[TensorSpec, ...]: ...

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...
