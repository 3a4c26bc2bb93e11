"""A model file on the host: where it is, which format, which runtime runs it."""

from __future__ import annotations

import functools
import shutil
from dataclasses import dataclass
from pathlib import Path

from device_agent.errors import ConfigError, ModelError
from device_agent.files import replaced_when_written
from device_agent.runtime.base import first_line

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
        if path.is_dir():
            raise ConfigError(f"{path} is a folder, not a model file")
        if not path.is_file():
            raise ConfigError(f"model file {path} does not exist")
        with path.open("rb") as f:
            head = f.read(8)
        if head[4:8] == _TFLITE_MAGIC:
            return cls(path, "tflite")
        if path.suffix.lower() == ".onnx":
            _check_onnx(path)
            return cls(path, "onnx")
        raise ConfigError(f"{path.name}: not an ONNX (.onnx) or TFLite (.tflite) model")

    @property
    def runtime(self) -> str:
        return FORMATS[self.format]

    @functools.cached_property
    def files(self) -> list[Path]:
        """The model file, and the files an ONNX model keeps its weights in (external data); read
        once (finding them parses the graph)."""
        return [self.path, *(external_data(self.path).values() if self.format == "onnx" else ())]

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def copy_to(self, out: Path) -> "ModelFile":
        """This model written to *out*, its external weight files beside it under the names it reads
        them by."""
        out = Path(out)
        pairs = [(self.path, out)] + [(f, out.parent / f.relative_to(self.path.parent)) for f in self.files[1:]]
        for source, target in pairs:
            target.parent.mkdir(parents=True, exist_ok=True)
            with replaced_when_written(target) as partial:  # a failed copy leaves no model-looking file
                shutil.copyfile(source, partial)
        return ModelFile(out, self.format)

    def load(self, threads: int | None = None):
        """A runtime with this model loaded (the device agent's own runtimes)."""
        from device_agent.runtime import RuntimeOptions, load_runtime

        return load_runtime(self.runtime, self.path, RuntimeOptions(threads=threads))

    def outputs_on_zeros(self, runtime=None) -> dict:
        """Load the model (*runtime*: loaded already) and run it once on zeros (a dimension without a
        size as 1): how a pass checks that a model it wrote loads and runs."""
        import numpy as np

        runtime = runtime or self.load()
        return runtime.run({spec.name: np.zeros([d if isinstance(d, int) else 1 for d in spec.shape], spec.dtype)
                            for spec in runtime.inputs})


# An external_data entry whose key is "location" (field 1, 8 bytes), its value (field 2) next, as
# protobuf writes an ONNX TensorProto's: what a device-only install (no onnx package) reads.
_LOCATION = b"\n\x08location\x12"


def external_data(path: Path, proto=None) -> dict[str, Path]:
    """The files an ONNX model keeps weights in beside itself (external data, as models over 2 GB
    must), by the name the model gives them (*proto*: the model, if it is loaded already); a name
    that leaves the model's folder, or a file that is not there, is a ModelError in one line."""
    found = {}
    for name in sorted(_external_names(path, proto)):
        where = (path.parent / name).resolve()
        if Path(name).is_absolute() or path.parent.resolve() not in where.parents:
            raise ModelError(f"{path.name} keeps weights in {name}, outside its own folder")
        if not where.is_file():
            raise ModelError(f"{path.name} keeps weights in {name}, which is not beside it")
        found[name] = path.parent / name
    return found


def _external_names(path: Path, proto=None) -> set[str]:
    """The external data locations of the initializers, read with the onnx package where it is
    installed, else from the file's bytes (a "location" key anywhere, a metadata entry's too)."""
    if proto is None:
        try:
            import onnx
        except ImportError:
            onnx = None
        proto = onnx.load(str(path), load_external_data=False) if onnx is not None else None
    if proto is not None:
        return {entry.value for init in proto.graph.initializer if init.data_location == 1  # TensorProto.EXTERNAL
                for entry in init.external_data if entry.key == "location"}
    import mmap

    names = set()
    with path.open("rb") as f:
        if not path.stat().st_size:
            return names
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            at = data.find(_LOCATION)
            while at >= 0:
                size, shift, i = 0, 0, at + len(_LOCATION)
                while i < len(data):  # the value's length, a varint
                    size |= (data[i] & 0x7F) << shift
                    shift, i = shift + 7, i + 1
                    if not data[i - 1] & 0x80:
                        break
                names.add(data[i:i + size].decode("utf-8", "replace"))
                at = data.find(_LOCATION, i + size)
    return names


def _check_onnx(path: Path) -> None:
    """A file named .onnx that ONNX cannot parse, or that holds no graph, fails here in one line
    rather than inside whichever pass reads it first."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError, onnx's own, OSError
        raise ModelError(f"{path.name} is not a readable ONNX model: {first_line(exc)}") from None
    if not proto.graph.output:
        raise ModelError(f"{path.name} is not a readable ONNX model: it has no graph outputs")
    external_data(path, proto)  # (its weight files must be there too)
