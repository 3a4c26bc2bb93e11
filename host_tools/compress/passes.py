"""Compression passes: one class per technique, a typed config each, registered by name.

A pass takes a model file and gives back a new one::

    class OnnxFp16(Pass):
        name = "onnx-fp16"
        formats = ("onnx",)

        @dataclass(frozen=True)
        class Config(PassConfig):
            keep_io_types: bool = field(default=True, metadata={"help": "float32 inputs and outputs"})

        def run(self, model, config, workdir): ...

Passes live in backend folders (``onnx/``, ``tflite/``, ``torch/``) and import their heavy
dependencies inside ``run``; ``requires`` names the modules and the extra that brings them,
so a missing one is a one-line "install edgefleet[...]" error before anything runs.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import importlib
import importlib.util
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from device_agent.errors import CompressionError, ConfigError, EdgefleetError
from device_agent.runtime.base import first_line
from host_tools.compress.data import Dataset
from host_tools.compress.model import ModelFile

BACKEND_MODULES = ("host_tools.compress.onnx", "host_tools.compress.tflite", "host_tools.compress.torch")
# A config field that takes calibration data; the workflow fills it from --calib when unset.
DATA_FIELD = "calibration"


@dataclass(frozen=True)
class PassConfig:
    """Base of every pass's config: frozen, typed, built from a recipe by ``make_config``.

    A config checks its own value ranges in ``__post_init__``, raising ValueError, which
    ``make_config`` turns into a one-line ConfigError: a bad option is refused with the recipe,
    before any model is loaded."""

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Dataset):
                value = value.source
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


class Pass:
    name: ClassVar[str]
    formats: ClassVar[tuple[str, ...]]  # model formats it takes
    summary: ClassVar[str]
    Config: ClassVar[type[PassConfig]] = PassConfig
    requires: ClassVar[tuple[str, ...]] = ()  # importable modules the pass needs
    extra: ClassVar[str] = "host"  # the edgefleet extra that installs them
    compresses: ClassVar[bool] = True  # False for graph preparation that only enables other passes

    def run(self, model: ModelFile, config: PassConfig, workdir: Path) -> ModelFile:
        raise NotImplementedError


REGISTRY: dict[str, type[Pass]] = {}
_progress: contextvars.ContextVar = contextvars.ContextVar("edgefleet_compress_progress", default=None)


def progress(message: str) -> None:
    """A pass's progress line (training epochs, sensitivity probes), shown by whoever runs it."""
    say = _progress.get()
    if say is not None:
        say(message)


@contextlib.contextmanager
def failing_as(pass_name: str, model: ModelFile):
    """Whatever the pass's library (onnx, ORT, litert-quantizer…) raises inside becomes one
    CompressionError line; edgefleet's own errors pass through."""
    try:
        yield
    except EdgefleetError:
        raise
    except Exception as exc:  # each library raises its own variety (Fail, ValueError, KeyError, protobuf…)
        raise CompressionError(f"{pass_name} failed on {model.path.name}: {type(exc).__name__}: "
                               f"{first_line(exc)}") from None


@contextlib.contextmanager
def showing_progress(say):
    token = _progress.set(say)
    try:
        yield
    finally:
        _progress.reset(token)


def register(cls: type[Pass]) -> type[Pass]:
    if cls.name in REGISTRY:
        raise RuntimeError(f"two compression passes named {cls.name!r}")
    REGISTRY[cls.name] = cls
    return cls


def all_passes() -> dict[str, type[Pass]]:
    for module in BACKEND_MODULES:
        importlib.import_module(module)
    return dict(sorted(REGISTRY.items()))


def get_pass(name: str) -> type[Pass]:
    passes = all_passes()
    if name not in passes:
        raise ConfigError(f"no compression pass named {name!r} (there are: {', '.join(passes)})")
    return passes[name]


def check_requirements(cls: type[Pass]) -> None:
    missing = [m for m in cls.requires if importlib.util.find_spec(m.split(".")[0]) is None]
    if missing:
        raise ConfigError(f"pass {cls.name} needs {', '.join(missing)}: pip install 'edgefleet[{cls.extra}]'")


def make_config(cls: type[Pass], values: dict[str, Any] | None = None) -> PassConfig:
    """The pass's config from recipe values (strings from a command line are converted)."""
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls.Config)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"pass {cls.name} has no option {', '.join(unknown)} "
                          f"(it has: {', '.join(fields) or 'none'})")
    hints = typing.get_type_hints(cls.Config)
    converted = {k: _convert(cls.name, k, hints[k], v) for k, v in values.items()}
    try:
        return cls.Config(**converted)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"pass {cls.name}: {exc}") from None


def describe_options(cls: type[Pass]) -> list[dict[str, Any]]:
    """Each option's name, type, default and help (for `edgefleet compress passes`)."""
    hints = typing.get_type_hints(cls.Config)
    return [{"name": f.name, "type": _type_name(hints[f.name]),
             "default": None if f.default is dataclasses.MISSING else
             (list(f.default) if isinstance(f.default, tuple) else f.default),
             "help": f.metadata.get("help", "")} for f in dataclasses.fields(cls.Config)]


def _convert(pass_name: str, key: str, hint, value):
    where = f"pass {pass_name} option {key}"
    options = _union_members(hint)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{where} cannot be empty")
    for option in options:
        if option is type(None):
            continue
        try:
            return _convert_one(option, value)
        except (TypeError, ValueError):
            continue
    raise ConfigError(f"{where} must be {_type_name(hint)}, not {value!r}")


def _convert_one(hint, value):
    origin = typing.get_origin(hint)
    if hint is Dataset:
        if isinstance(value, Dataset):
            return value
        raise TypeError
    if origin is Literal:
        if value in typing.get_args(hint):
            return value
        raise ValueError
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise TypeError
        return tuple(str(i).strip() for i in items if str(i).strip())
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ValueError
    if hint is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not math.isfinite(number := float(value)):  # (NaN passes every range check)
            raise ValueError
        return number
    if hint is str:
        if isinstance(value, (str, Path)):
            return str(value)
        raise TypeError
    raise TypeError


def _union_members(hint) -> tuple:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _type_name(hint) -> str:
    names = []
    for option in _union_members(hint):
        if option is type(None):
            continue
        if typing.get_origin(option) is Literal:
            names.append(" | ".join(map(str, typing.get_args(option))))
        elif typing.get_origin(option) is tuple:
            names.append("list of names")
        elif option is Dataset:
            names.append("data")
        else:
            names.append(option.__name__)
    return " or ".join(names)


def short_name(number: int) -> str:
    """t0, t1, ... tz, t10: what the compact passes call internal tensors."""
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    text = ""
    while True:
        number, rest = divmod(number, 36)
        text = digits[rest] + text
        if number == 0:
            return "t" + text
