"""ONNX Runtime behind the ModelRuntime interface."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from device_agent.bundle.manifest import TensorSpec
from device_agent.errors import ModelError

# ONNX Runtime's type strings -> NumPy dtype names.
_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int16)": "int16",
    "tensor(int32)": "int32", "tensor(int64)": "int64", "tensor(bool)": "bool",
}


class OnnxRuntime:
    name = "onnxruntime"

    def __init__(self, model_path: Path, *, threads: int | None = None,
                 providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> None:
        import onnxruntime as ort  # imported here so a TFLite-only device never loads it

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        # Spinning worker threads burn a core between calls; on a battery or a Pi that is the wrong trade.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self._session = ort.InferenceSession(str(model_path), sess_options=options,
                                                 providers=list(providers))
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... family
            raise ModelError(f"ONNX Runtime cannot load {Path(model_path).name}: {_first_line(exc)}") from None
        self._inputs = tuple(_spec(i) for i in self._session.get_inputs())
        self._outputs = tuple(_spec(o) for o in self._session.get_outputs())

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._outputs

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            values = self._session.run(None, dict(feeds))
        except Exception as exc:
            raise ModelError(f"inference failed: {_first_line(exc)}") from None
        return {spec.name: value for spec, value in zip(self._outputs, values)}


def _spec(arg) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) else (d or "?") for d in (arg.shape or ()))
    return TensorSpec(name=arg.name, shape=shape, dtype=_ORT_TYPES.get(arg.type, arg.type))


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
