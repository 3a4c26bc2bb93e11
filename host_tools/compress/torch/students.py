"""The built-in student family: small networks scaled in width and depth to a parameter budget.

- ``cnn`` for image-like inputs [N, C, H, W]: ``depth`` 3x3 conv blocks (width doubling), each
  followed by a 2x2 max-pool while the map is at least 8x8, then a linear classifier; when no
  width fits the budget that way (a 224x224 input's map is still 56x56 after two blocks, and the
  classifier alone outgrows a quarter of a MobileNet), more max-pools follow the blocks while the
  map is at least 8x8;
- ``mlp`` for vectors [N, F], or anything else float (a sequence of vectors [N, T, F], flattened):
  ``depth`` hidden layers;
- ``bag`` for token ids [N, T] (int): an embedding averaged over tokens, then an MLP.

``fit`` picks the widest student whose parameters stay within the budget. A student is there to
be fast, not only small: the cnn's blocks pool as they go, so the later, wider convolutions run on
a smaller map, and its widths are multiples of 8 where the budget allows (as MobileNet's are),
because ONNX Runtime computes convolutions in blocks of 8 or 16 channels and a convolution of 15
channels costs more than one of 16 (docs/benchmarks.md, Compression, has the timings).
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from device_agent.errors import ConfigError, NotApplicable

FAMILIES = ("cnn", "mlp", "bag")


class CnnStudent(nn.Module):
    def __init__(self, shape: Sequence[int], classes: int, width: int, depth: int, squeeze: bool = False) -> None:
        super().__init__()
        channels, height, width_px = shape
        layers, c = [], channels
        for i in range(depth):
            layers += [nn.Conv2d(c, width * 2 ** i, 3, padding=1), nn.ReLU()]
            c = width * 2 ** i
            if height >= 8 and width_px >= 8:
                layers.append(nn.MaxPool2d(2))
                height, width_px = height // 2, width_px // 2
        while squeeze and height >= 8 and width_px >= 8:
            layers.append(nn.MaxPool2d(2))
            height, width_px = height // 2, width_px // 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c * height * width_px, classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class MlpStudent(nn.Module):
    def __init__(self, features: int, classes: int, width: int, depth: int) -> None:
        super().__init__()
        layers, f = [], features
        for _ in range(depth):
            layers += [nn.Linear(f, width), nn.ReLU()]
            f = width
        self.net = nn.Sequential(*layers, nn.Linear(f, classes))

    def forward(self, x):
        return self.net(x.flatten(1) if x.dim() > 2 else x)


class BagStudent(nn.Module):
    def __init__(self, vocab: int, classes: int, width: int, depth: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.head = MlpStudent(width, classes, width, max(depth - 1, 0))

    def forward(self, ids):
        return self.head(self.embed(ids).mean(dim=1))


def build(family: str, sample: torch.Tensor, classes: int, width: int, depth: int, vocab: int = 0,
          squeeze: bool = False) -> nn.Module:
    if family == "cnn":
        if sample.dim() != 4:
            raise NotApplicable(f"the cnn student takes [N, C, H, W] inputs, not rank {sample.dim()}")
        return CnnStudent(sample.shape[1:], classes, width, depth, squeeze)
    if family == "mlp":
        return MlpStudent(int(sample[0].numel()), classes, width, depth)
    if family == "bag":
        return BagStudent(vocab, classes, width, depth)
    raise ConfigError(f"no student family {family!r} (there are: {', '.join(FAMILIES)})")


def family_for(sample: torch.Tensor) -> str:
    if not sample.is_floating_point():
        return "bag"
    return "cnn" if sample.dim() == 4 else "mlp"


def fit(family: str, sample: torch.Tensor, classes: int, depth: int, budget: int, vocab: int = 0) -> nn.Module:
    """The widest student of *family* with at most *budget* parameters."""
    best = None
    # below 8 any width; from 8 on, multiples of 8 for the convolutions' channel blocks
    widths = [*range(2, 8), *range(8, 1025, 8)] if family == "cnn" else range(2, 1025)
    for squeeze in ((False, True) if family == "cnn" else (False,)):
        for width in widths:
            student = build(family, sample, classes, width, depth, vocab, squeeze)
            if count(student) > budget:
                break
            best = student
        if best is not None:
            break
    if best is None:
        raise NotApplicable(f"no {family} student of depth {depth} fits in {budget} parameters")
    return best


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def user_module(spec: str) -> nn.Module:
    """``path/to/file.py:ClassName`` (or ``package.module:ClassName``), built with no arguments."""
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise ConfigError(f"student {spec!r}: give FILE.py:CLASS or MODULE:CLASS")
    try:
        if target.endswith(".py"):
            path = Path(target)
            module_spec = importlib.util.spec_from_file_location(f"edgefleet_student_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
        return getattr(module, name)()
    except Exception as exc:  # the user's code: any failure is reported in one line
        raise ConfigError(f"cannot build student {spec}: {type(exc).__name__}: {exc}") from None
