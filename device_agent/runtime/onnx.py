"""ONNX Runtime behind the ModelRuntime interface."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import numpy as np

from device_agent.bundle.manifest import TensorSpec
from device_agent.errors import ModelError
from device_agent.runtime.base import RuntimeOptions

# Preferred first: TensorRT and CUDA where a Jetson's build has them, the CPU always.
PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")

# ONNX Runtime's type strings -> NumPy dtype names.
_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int16)": "int16",
    "tensor(int32)": "int32", "tensor(int64)": "int64", "tensor(bool)": "bool", "tensor(string)": "str",
}


class OnnxRuntime:
    name = "onnxruntime"

    def __init__(self, model_path: Path, options: RuntimeOptions = RuntimeOptions()) -> None:
        import onnxruntime as ort  # imported here so a TFLite-only device never loads it

        providers = choose_providers(ort.get_available_providers(), options.onnx_providers)
        session_options = ort.SessionOptions()
        if options.threads:
            session_options.intra_op_num_threads = options.threads
        session_options.log_severity_level = 3
        # Spinning worker threads burn a core between calls; on a battery or a Pi that is the wrong trade.
        session_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(str(model_path), sess_options=session_options,
                                                 providers=list(providers))
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... family
            raise ModelError(f"ONNX Runtime cannot load {Path(model_path).name}: {_reason(exc)}") from None
        self.providers = tuple(self._session.get_providers())
        self._inputs = tuple(_spec(i) for i in self._session.get_inputs())
        self._outputs = tuple(_spec(o) for o in self._session.get_outputs())
        self._output_names = [spec.name for spec in self._outputs]
        # outputs ORT gives as a list of {class: score} dicts (a ZipMap: scikit-learn classifiers as
        # skl2onnx exports them), given as [N, classes] arrays like any classifier's scores
        self._maps = [o.name for o in self._session.get_outputs() if _MAP_SEQUENCE.match(o.type)]
        self.classes: dict[str, tuple] = {}  # a ZipMap output's class labels, in its columns' order, once run
        # and string outputs (a classifier's labels when it was trained on names) as NumPy strings, not
        # Python objects: a bundle's sample and the local API's frames hold them without pickling
        self._strings = [o.name for o in self._session.get_outputs() if o.type == "tensor(string)"]
        # Passed to every call: given None, the C++ run builds default options on each call, 3-6 µs
        # of a 20-40 µs single-sample call of the reference CNN here. Only read during a run.
        self._run_options = ort.RunOptions()
        # A failing call raises ModelError with ORT's message; its own log of the failure, two coloured
        # lines on stderr per call, would only repeat it.
        self._run_options.log_severity_level = 4
        self._direct_run = _direct_run(self._session)

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._outputs

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = feeds if type(feeds) is dict else dict(feeds)
        try:
            values = self._direct_run(self._output_names, feeds, self._run_options)
        except Exception:
            try:
                values = self._session.run(self._output_names, feeds, self._run_options)
            except Exception as exc:
                raise ModelError(f"inference failed: {_reason(exc)}") from None
            self._direct_run = _direct_run(self._session)  # a provider fallback rebuilds the session
        outputs = dict(zip(self._output_names, values))
        for name in self._maps:
            if outputs[name] and name not in self.classes:
                self.classes[name] = tuple(sorted(outputs[name][0]))
            outputs[name] = _scores(outputs[name])
        for name in self._strings:
            outputs[name] = np.asarray(outputs[name]).astype(str)
        return outputs


def _scores(maps: list, dtype=np.float32) -> np.ndarray:
    """A ZipMap's list of {class: score} dicts as [N, classes], the classes in sorted order (the
    order of a scikit-learn classifier's classes_, which skl2onnx's ZipMap keeps)."""
    if not maps:
        return np.zeros((0, 0), dtype)
    keys = sorted(maps[0])
    return np.array([[row[k] for k in keys] for row in maps], dtype)


_CODE = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")


def _reason(exc: BaseException) -> str:
    """ONNX Runtime's message in one line, without its error code: the first line, and the lines
    ("index: 0 Got: 3 Expected: 2") that alone say which dimension of an input is wrong; not its
    closing advice ("Please fix either the inputs/outputs or the model.")."""
    lines = [line.strip() for line in str(exc).strip().splitlines()]
    if not lines:
        return type(exc).__name__
    head, indices = _CODE.sub("", lines[0]), [line for line in lines[1:] if line.startswith("index:")]
    return f"{head}: {'; '.join(indices)}" if indices else head


def _direct_run(session):
    """The session's C++ run. InferenceSession.run checks again in Python, on every call, what the C++
    run checks anyway (input names, graph-capture mode, OrtValue ownership): about 7 µs a call in
    ORT 1.32, a quarter of a small model's single-sample call. Errors are retried through the public
    run, which keeps its execution-provider fallback and its messages; an ORT without the attribute
    gets the public run."""
    inner = getattr(session, "_sess", None)
    return inner.run if callable(getattr(inner, "run", None)) else session.run


_MAP_SEQUENCE = re.compile(r"^seq\(map\((int64|string),tensor\(float\)\)\)$")


def _spec(arg) -> TensorSpec:
    if _MAP_SEQUENCE.match(arg.type):  # (given as an array: OnnxRuntime.run)
        return TensorSpec(name=arg.name, shape=("?", "?"), dtype="float32")
    shape = tuple(d if isinstance(d, int) else (d or "?") for d in (arg.shape or ()))
    return TensorSpec(name=arg.name, shape=shape, dtype=_ORT_TYPES.get(arg.type, arg.type))


def choose_providers(available: list[str], override: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The execution providers to ask for: the override (all must exist), else the best the device has."""
    if override:
        missing = [p for p in override if p not in available]
        if missing:
            raise ModelError(f"execution provider(s) {', '.join(missing)} not available here "
                             f"(this onnxruntime has {', '.join(available)})")
        return tuple(override)
    chosen = tuple(p for p in PROVIDER_PREFERENCE if p in available)
    return chosen or ("CPUExecutionProvider",)
