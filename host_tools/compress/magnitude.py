"""Magnitude pruning's part that is the same for every format: the config, and where the cut falls."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from host_tools.compress.passes import PassConfig


@dataclass(frozen=True)
class MagnitudeConfig(PassConfig):
    sparsity: float = field(default=0.5, metadata={"help": "fraction of weights set to zero (0..0.99)"})
    scope: Literal["global", "per-layer"] = field(default="global", metadata={
        "help": "one threshold over all layers, or the same sparsity in each layer"})
    min_elements: int = field(default=1024, metadata={"help": "leave smaller weight tensors alone"})

    def __post_init__(self) -> None:  # (see PassConfig)
        if not 0 < self.sparsity < 1:
            raise ValueError(f"sparsity must be between 0 and 1, not {self.sparsity}")


def thresholds(weights: list[np.ndarray], config: MagnitudeConfig) -> list[float]:
    """Per weight, the magnitude at or under which its entries become zero."""
    if config.scope == "global":
        return [np.quantile(np.concatenate([np.abs(w).ravel() for w in weights]), config.sparsity)] * len(weights)
    return [np.quantile(np.abs(w), config.sparsity) for w in weights]
