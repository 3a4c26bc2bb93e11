"""Model runtimes behind one interface: load, describe inputs and outputs, run."""

from __future__ import annotations

from pathlib import Path

from device_agent.errors import ModelError
from device_agent.runtime.base import ModelRuntime, RuntimeOptions


def load_runtime(runtime: str, model_path: Path, options: RuntimeOptions | None = None) -> ModelRuntime:
    """Load *model_path* with the runtime a manifest names (``onnxruntime`` or ``tflite``)."""
    options = options or RuntimeOptions()
    if runtime == "onnxruntime":
        from device_agent.runtime.onnx import OnnxRuntime

        return OnnxRuntime(model_path, options)
    if runtime == "tflite":
        from device_agent.runtime.tflite import TFLiteRuntime

        return TFLiteRuntime(model_path, options)
    raise ModelError(f"runtime {runtime!r} is not available in this agent")


__all__ = ["ModelRuntime", "RuntimeOptions", "load_runtime"]
