"""The one small interface every model runtime implements, and the options they take."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol

import numpy as np

from device_agent.bundle.manifest import TensorSpec
from device_agent.errors import ConfigError


@dataclass(frozen=True)
class RuntimeOptions:
    """How runtimes are set up on this device (from the agent's config)."""

    threads: int | None = None  # None: the runtime's own choice
    # ONNX Runtime execution providers in order of preference; empty: pick from what the device has.
    onnx_providers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.threads is not None and (type(self.threads) is not int or not 1 <= self.threads <= 1024):
            raise ConfigError(f"threads must be 1 to 1024 (or unset: the runtime's choice), not {self.threads!r}")


class ModelRuntime(Protocol):
    """A loaded model: what it takes, what it gives, and a way to run it.

    ``run`` may be called from several threads at once; a runtime that is not
    thread-safe serialises calls itself.
    """

    name: str

    @property
    def inputs(self) -> tuple[TensorSpec, ...]: ...

    @property
    def outputs(self) -> tuple[TensorSpec, ...]: ...

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
