"""Structured pruning's part that is the same for every format: the config, the checks before a
pass prunes anything, the union-find that ties layers whose channels meet, which units go, and
cutting a grouped convolution's inputs group by group."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from device_agent.errors import ConfigError
from host_tools.compress.data import Dataset
from host_tools.compress.passes import PassConfig


@dataclass(frozen=True)
class ChannelPruningConfig(PassConfig):
    ratio: float = field(default=0.5, metadata={
        "help": "fraction of each prunable layer's channels (or attention heads) removed"})
    criterion: Literal["l1", "l2"] = field(default="l1", metadata={"help": "channel importance: weight norm"})
    exclude: tuple[str, ...] = field(default=(), metadata={
        "help": "layers whose channels stay: ONNX node names; TFLite output tensor names, or 'CONV_2D #3' "
                "as the report names them"})
    recover_epochs: int = field(default=0, metadata={
        "help": "fine-tune the pruned model this many epochs with the unpruned one as teacher "
                "(needs the distill extra and --calib inputs to train on)"})
    calibration: Dataset | str | None = field(default=None, metadata={
        "help": "inputs to fine-tune on (unlabelled is fine); default: --train, else --calib", "trains": True})
    labels_weight: float = field(default=0.0, metadata={
        "help": "weight of the hard-label loss when the training data has labels (0: soft targets only)"})

    def __post_init__(self) -> None:  # (see PassConfig)
        if not 0 < self.ratio < 1:
            raise ValueError(f"ratio must be between 0 and 1, not {self.ratio}")
        if self.recover_epochs < 0:
            raise ValueError(f"recover_epochs must be 0 or more, not {self.recover_epochs}")


def check(pass_name: str, config: ChannelPruningConfig) -> None:
    """What must hold before a channel-pruning pass starts, beyond its config's own checks: for
    recovery, PyTorch and inputs to train on."""
    if config.recover_epochs > 0 and importlib.util.find_spec("torch") is None:
        raise ConfigError(f"{pass_name} recover_epochs needs PyTorch: pip install 'edgefleet[distill]'")
    if config.recover_epochs > 0 and config.calibration is None:
        raise ConfigError(f"{pass_name} recover_epochs needs inputs to train on (--train or --calib)")


class UnionFind:
    """Sets of 0..n-1 joined pair by pair: the layers whose channels are tied."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def root(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def join(self, i: int, j: int) -> None:
        self.parent[self.root(j)] = self.root(i)

    def sets(self) -> list[list[int]]:
        found: dict[int, list[int]] = {}
        for i in range(len(self.parent)):
            found.setdefault(self.root(i), []).append(i)
        return list(found.values())


def least_important(score: np.ndarray, ratio: float, segments: int = 1) -> np.ndarray:
    """The units to remove: *ratio* of them, the lowest scores; with *segments*, as many from each
    equal run of the units (the groups of a grouped convolution that reads or writes them)."""
    runs = score.reshape(segments, -1)
    keep_count = max(1, int(round(runs.shape[1] * (1 - ratio))))
    return np.concatenate([np.setdiff1d(np.arange(runs.shape[1]), np.argsort(-run, kind="stable")[:keep_count])
                           + s * runs.shape[1] for s, run in enumerate(runs)])


def cut_grouped_inputs(weight: np.ndarray, groups: int, gone, axis: int) -> np.ndarray:
    """A grouped convolution's weight (output channels on axis 0, each group's own input channels on
    *axis*) without its input channels *gone*, numbered across all groups, as many from each: each
    group's rows keep the columns of its own channels that stay."""
    rows, per_group = weight.shape[0] // groups, weight.shape[axis]
    keep = [[j for j in range(per_group) if k * per_group + j not in gone] for k in range(groups)]
    if len({len(columns) for columns in keep}) != 1:
        raise ValueError("a grouped convolution's groups would lose different numbers of input channels")
    return np.concatenate([np.take(weight[k * rows:(k + 1) * rows], columns, axis=axis)
                           for k, columns in enumerate(keep)])
