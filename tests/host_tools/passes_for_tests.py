"""Passes that only the tests run (not registered: a test puts one in the registry while it runs).
They live in a module of their own so that the compress child process can import them by name."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from host_tools.compress.model import ModelFile
from host_tools.compress.passes import Pass, PassConfig, progress


class HandsBack(Pass):
    """Hands back the model file its config names, as if it had made it."""

    name = "test-hands-back"
    formats = ("onnx", "tflite")
    summary = "hands back a model file the test made"

    @dataclass(frozen=True)
    class Config(PassConfig):
        path: str = ""

    def run(self, model, config, workdir):
        return ModelFile.open(Path(config.path))


class LoadsInOrt(Pass):
    """Loads the model file its config names in ONNX Runtime, as passes that calibrate or probe do,
    after a progress line; hands back its input."""

    name = "test-loads-in-ort"
    formats = ("onnx",)
    summary = "loads a model file the test made in ONNX Runtime"

    @dataclass(frozen=True)
    class Config(PassConfig):
        path: str = ""

    def run(self, model, config, workdir):
        import onnxruntime

        progress(f"loading {Path(config.path).name}")
        onnxruntime.InferenceSession(config.path, providers=["CPUExecutionProvider"])
        return model
