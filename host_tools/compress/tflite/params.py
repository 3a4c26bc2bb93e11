"""``tflite-int8-params``: the TFLite counterpart of ``onnx-int8-params``.

litert-quantizer turns the weights of the layers it quantizes into int8 and leaves every other
float constant as it was: a transformer's position table, a layer scale, a per-position bias added
to the activations. On the reference transformer the 16 x 64 position table is 4 KiB of a 95 KiB
int8 file. This pass stores each such constant of ``min_elements`` or more as int8 with one scale
and zero point, read through a DEQUANTIZE that TFLite evaluates once, when the interpreter is
built (its input is constant), so compute stays as it was. The error is at most half a step of
1/255 of the constant's range, which the accuracy guard measures like any other pass's.

Only constants that elementwise arithmetic or a GATHER reads are converted: a layer's weight or
bias stays a constant of the layer (kernels and delegates want those when the interpreter is
built). A GATHER's table is a Keras Embedding as TensorFlow's converter writes it, which
litert-quantizer's dynamic-range recipe leaves float (it knows EMBEDDING_LOOKUP): most of a text
model's weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from device_agent.errors import CompressionError, NotApplicable
from device_agent.runtime.base import first_line
from host_tools.compress.model import ModelFile
from host_tools.compress.passes import Pass, PassConfig, failing_as, register
from host_tools.compress.tflite import flatbuffer

ELEMENTWISE = {"ADD", "SUB", "MUL", "DIV", "SQUARED_DIFFERENCE", "MAXIMUM", "MINIMUM"}
READERS = ELEMENTWISE | {"GATHER"}  # (a GATHER's float input is its table: its indices are integers)


@register
class TfliteInt8Params(Pass):
    name = "tflite-int8-params"
    formats = ("tflite",)
    summary = "float constants left by a quantizer (position tables, scales) stored as int8"
    requires = ("ai_edge_litert",)
    extra = "tflite"

    @dataclass(frozen=True)
    class Config(PassConfig):
        min_elements: int = field(default=128, metadata={"help": "smallest constant converted"})

    def run(self, model, config, workdir):
        out = Path(workdir) / f"{model.path.stem}.params8.tflite"
        with failing_as(self.name, model):
            tree, outside = flatbuffer.read(model.path)
            if store_params_as_int8(tree, config.min_elements) == 0:
                raise NotApplicable(f"{model.path.name} has no float constant of {config.min_elements} elements "
                                    "or more that only elementwise arithmetic or a GATHER reads")
            flatbuffer.write(tree, outside, out)
        result = ModelFile(out, "tflite")
        try:
            result.outputs_on_zeros()
        except Exception as exc:  # noqa: BLE001 — the interpreter raises RuntimeError, ValueError, ModelError
            raise CompressionError(f"{self.name} made a model of {model.path.name} that does not run "
                                   f"({first_line(exc)}); nothing written") from None
        return result


def store_params_as_int8(tree, min_elements: int) -> int:
    """Rewrite *tree* in place; returns how many constants were converted."""
    from ai_edge_litert import schema_py_generated as schema

    readers: dict[tuple[int, int], set[str]] = {}
    for g, graph in enumerate(tree.subgraphs):
        for op in graph.operators:
            code = tree.operatorCodes[op.opcodeIndex]
            for t in op.inputs:
                readers.setdefault((g, int(t)), set()).add(flatbuffer.op_name(code.builtinCode,
                                                                             code.deprecatedBuiltinCode))
    holders = flatbuffer.buffer_holders(tree)
    converted = 0
    for g, graph in enumerate(tree.subgraphs):
        pinned = set(graph.inputs) | set(graph.outputs)
        dequantize = []
        for index, tensor in enumerate(graph.tensors):
            data = tree.buffers[tensor.buffer].data
            ops = readers.get((g, index), set())
            if (tensor.type != schema.TensorType.FLOAT32 or data is None or len(data) < 4 * min_elements
                    or index in pinned or not ops or not ops <= READERS or holders[tensor.buffer] != 1
                    or tensor.isVariable
                    or (tensor.quantization is not None and tensor.quantization.scale is not None)):
                continue
            values = np.frombuffer(bytes(data), np.float32)
            if not np.isfinite(values).all():
                continue
            lo, hi = min(float(values.min()), 0.0), max(float(values.max()), 0.0)
            scale = (hi - lo) / 255 or 1.0
            zero = int(np.clip(round(-128 - lo / scale), -128, 127))
            q = np.clip(np.round(values / scale) + zero, -128, 127).astype(np.int8)
            tree.buffers[tensor.buffer].data = np.frombuffer(q.tobytes(), np.uint8).copy()
            stored = schema.TensorT()
            stored.shape, stored.type, stored.buffer = tensor.shape, schema.TensorType.INT8, tensor.buffer
            stored.quantization = schema.QuantizationParametersT()
            stored.quantization.scale, stored.quantization.zeroPoint = [scale], [zero]
            stored.hasRank = tensor.hasRank
            tree.buffers.append(schema.BufferT())  # the float tensor is now computed: an empty buffer
            tensor.buffer = len(tree.buffers) - 1
            graph.tensors.append(stored)
            op = schema.OperatorT()
            # (version 2: an int8 input)
            op.opcodeIndex = flatbuffer.opcode(tree, schema.BuiltinOperator.DEQUANTIZE, 2)
            op.inputs, op.outputs = [len(graph.tensors) - 1], [index]
            dequantize.append(op)
        graph.operators[:0] = dequantize  # before every reader: their input is a constant
        converted += len(dequantize)
    return converted
