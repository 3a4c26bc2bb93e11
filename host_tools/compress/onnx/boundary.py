"""The edge between edgefleet and onnx/onnxruntime.quantization: imports, logging, errors."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from device_agent.errors import CompressionError, EdgefleetError
from device_agent.runtime.base import first_line
from host_tools.compress.model import ModelFile

# Ops whose weights int8 quantization turns into integers; the rest only carry activations.
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def quiet_ort_quantizer() -> None:
    """ORT's quantizer logs progress and warnings through the root logger; keep the terminal ours."""
    logging.getLogger().setLevel(logging.ERROR)


@contextlib.contextmanager
def failing_as(pass_name: str, model: ModelFile):
    """Any exception onnx or ORT raises inside becomes one CompressionError line."""
    try:
        yield
    except EdgefleetError:
        raise
    except Exception as exc:  # onnx/ORT raise a wide variety (Fail, ValueError, KeyError, protobuf...)
        raise CompressionError(f"{pass_name} failed on {model.path.name}: {type(exc).__name__}: "
                               f"{first_line(exc)}") from None


def output_path(workdir: Path, model: ModelFile, tag: str) -> Path:
    return Path(workdir) / f"{model.path.stem}.{tag}.onnx"


def weighted_nodes(path: Path) -> list[tuple[str, str]]:
    """(name, op type) of the nodes int8 would quantize whose weight is a constant initializer."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    constants = {i.name for i in graph.initializer}
    return [(n.name, n.op_type) for n in graph.node
            if n.op_type in WEIGHTED_OPS and len(n.input) > 1 and n.input[1] in constants]
