"""TensorFlow Lite (LiteRT) behind the ModelRuntime interface.

The interpreter comes from the first package present: ``ai_edge_litert`` (LiteRT,
the current name), ``tflite_runtime`` (the older slim wheel, common on Pis), then
full TensorFlow. A TFLite interpreter is not thread-safe, so calls are serialised.

A fully integer-quantized model (int8 inputs and outputs with a scale and zero point) still
takes and gives float32 here: inputs are quantized and outputs dequantized at the edge, so
callers, health-check samples and telemetry do not change with the model's precision.
"""

from __future__ import annotations

import importlib
import threading
from pathlib import Path
from typing import Mapping

import numpy as np

from device_agent.bundle.manifest import TensorSpec
from device_agent.errors import ModelError
from device_agent.runtime.base import RuntimeOptions, first_line

INTERPRETER_MODULES = ("ai_edge_litert.interpreter", "tflite_runtime.interpreter", "tensorflow.lite")


def find_interpreter():
    """The Interpreter class of the first TFLite package installed, and the package's name."""
    for module_name in INTERPRETER_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        return module.Interpreter, module_name.split(".")[0]
    raise ModelError("no TFLite runtime installed: pip install ai-edge-litert (or tflite-runtime)")


class TFLiteRuntime:
    name = "tflite"

    def __init__(self, model_path: Path, options: RuntimeOptions = RuntimeOptions()) -> None:
        interpreter_cls, self.package = find_interpreter()
        try:
            self._interpreter = interpreter_cls(model_path=str(model_path), num_threads=options.threads)
            self._interpreter.allocate_tensors()
        except Exception as exc:  # the interpreter raises ValueError/RuntimeError with C++ text
            raise ModelError(f"TFLite cannot load {Path(model_path).name}: {first_line(exc)}") from None
        self._lock = threading.Lock()
        self._input_details = self._interpreter.get_input_details()
        self._output_details = self._interpreter.get_output_details()
        self._inputs = tuple(_spec(d) for d in self._input_details)
        self._outputs = tuple(_spec(d) for d in self._output_details)

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._outputs

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [spec.name for spec in self._inputs if spec.name not in feeds]
        if missing:
            raise ModelError(f"inference failed: missing input(s) {', '.join(missing)}")
        with self._lock:
            try:
                self._resize_for(feeds)
                for detail in self._input_details:
                    value = np.asarray(feeds[detail["name"]])
                    if _quantized(detail) and value.dtype.kind == "f":
                        value = _quantize(value, detail)
                    if value.dtype != detail["dtype"]:
                        raise ModelError(f"inference failed: input {detail['name']!r} is {value.dtype}, "
                                         f"the model takes {np.dtype(detail['dtype']).name}")
                    self._interpreter.set_tensor(detail["index"], value)
                self._interpreter.invoke()
                return {d["name"]: _dequantize(self._interpreter.get_tensor(d["index"]), d) if _quantized(d)
                        else self._interpreter.get_tensor(d["index"]).copy() for d in self._output_details}
            except ModelError:
                raise
            except Exception as exc:
                raise ModelError(f"inference failed: {first_line(exc)}") from None

    def _resize_for(self, feeds: Mapping[str, np.ndarray]) -> None:
        # Dynamic dimensions: resize to what this call brings, then re-allocate once.
        resized = False
        for detail in self._input_details:
            shape = tuple(np.shape(feeds[detail["name"]]))
            if shape != tuple(detail["shape"]):
                self._interpreter.resize_tensor_input(detail["index"], list(shape))
                resized = True
        if resized:
            self._interpreter.allocate_tensors()
            self._input_details = self._interpreter.get_input_details()
            self._output_details = self._interpreter.get_output_details()


def _spec(detail: dict) -> TensorSpec:
    signature = detail.get("shape_signature")
    dims = signature if signature is not None and len(signature) else detail["shape"]
    return TensorSpec(name=detail["name"], shape=tuple(int(d) if d >= 0 else "?" for d in dims),
                      dtype="float32" if _quantized(detail) else np.dtype(detail["dtype"]).name)


def _quantized(detail: dict) -> bool:
    """An integer tensor with one scale: it stands for real values (scale * (q - zero_point))."""
    scale, _ = detail.get("quantization", (0.0, 0))
    return np.dtype(detail["dtype"]).kind in "iu" and scale > 0


def _quantize(value: np.ndarray, detail: dict) -> np.ndarray:
    scale, zero_point = detail["quantization"]
    info = np.iinfo(detail["dtype"])
    return np.clip(np.round(value / scale) + zero_point, info.min, info.max).astype(detail["dtype"])


def _dequantize(value: np.ndarray, detail: dict) -> np.ndarray:
    scale, zero_point = detail["quantization"]
    return ((value.astype(np.float32) - zero_point) * scale).astype(np.float32)
