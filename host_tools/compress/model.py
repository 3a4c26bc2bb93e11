"""A model file on the host: where it is, which format, which runtime runs it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from device_agent.errors import ConfigError

FORMATS = {"onnx": "onnxruntime", "tflite": "tflite"}
# A TFLite flatbuffer carries this identifier at bytes 4..8.
_TFLITE_MAGIC = b"TFL3"


@dataclass(frozen=True)
class ModelFile:
    path: Path
    format: str  # "onnx" | "tflite"

    @classmethod
    def open(cls, path: str | Path) -> "ModelFile":
        """The model at *path*; its format from the file itself, not only the suffix."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"model file {path} does not exist")
        with path.open("rb") as f:
            head = f.read(8)
        if head[4:8] == _TFLITE_MAGIC:
            return cls(path, "tflite")
        if path.suffix.lower() == ".onnx":
            return cls(path, "onnx")
        raise ConfigError(f"{path.name}: not an ONNX (.onnx) or TFLite (.tflite) model")

    @property
    def runtime(self) -> str:
        return FORMATS[self.format]

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size

    def load(self, threads: int | None = None):
        """A runtime with this model loaded (the device agent's own runtimes)."""
        from device_agent.runtime import RuntimeOptions, load_runtime

        return load_runtime(self.runtime, self.path, RuntimeOptions(threads=threads))
