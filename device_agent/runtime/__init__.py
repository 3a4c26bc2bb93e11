"""Model runtimes behind one interface: load, describe inputs and outputs, run."""

from __future__ import annotations

from pathlib import Path

from device_agent.errors import ModelError
from device_agent.runtime.base import ModelRuntime


def load_runtime(runtime: str, model_path: Path, *, threads: int | None = None) -> ModelRuntime:
    """Load *model_path* with the runtime a manifest names."""
    if runtime == "onnxruntime":
        from device_agent.runtime.onnx import OnnxRuntime

        return OnnxRuntime(model_path, threads=threads)
    raise ModelError(f"runtime {runtime!r} is not available in this agent")


__all__ = ["ModelRuntime", "load_runtime"]
