"""Fused LSTMs in TFLite models, whose weights litert-quantizer leaves in float.

TensorFlow's converter fuses a Keras 2 LSTM into one UNIDIRECTIONAL_SEQUENCE_LSTM op whose weights
are eight matrices among its inputs (input-to-gate and recurrent-to-gate, one per gate).
litert-quantizer does not know the op, so every recipe left those weights — most of a keyword
spotter's — float32, and int8-dynamic handed back 0.99x the size. The quantization passes store
them here, after litert-quantizer has done the rest of the model:

- ``hybrid`` (dynamic-range and full int8): int8 weights, one scale per matrix, which TFLite's
  LSTM kernel multiplies with its inputs quantized at run time, as TensorFlow's own
  dynamic-range quantization writes the op (full int8 feeds it float32 too: litert-quantizer
  leaves it between a DEQUANTIZE and a QUANTIZE);
- ``int8`` and ``float16`` (weight-only and fp16): the weights stored so, each behind a
  DEQUANTIZE that gives the op float32 weights, computed in float.

An LSTM with peephole or projection weights, or whose weights another op reads too, is left as it
is, and the pass says so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from host_tools.compress.tflite import flatbuffer

LSTM_OP = "UNIDIRECTIONAL_SEQUENCE_LSTM"
WEIGHTS = (1, 2, 3, 4, 5, 6, 7, 8)  # the op's inputs holding its gate matrices
_OPTIONAL_WEIGHTS = (9, 10, 11, 16, 17)  # peepholes and the projection: kept float, so the op is left alone


def store_weights(path: Path, how: str) -> tuple[int, int]:
    """Rewrite the model at *path* with its fused LSTMs' float32 weights stored *how* ("hybrid",
    "int8" or "float16"); returns how many LSTMs were rewritten, and how many with float32 weights
    were left as they are."""
    from ai_edge_litert import schema_py_generated as schema

    tree, outside = flatbuffer.read(path)
    holders = flatbuffer.buffer_holders(tree)
    lstm = flatbuffer.opcode(tree, schema.BuiltinOperator.UNIDIRECTIONAL_SEQUENCE_LSTM, 3 if how == "hybrid" else 1)
    dequantize = flatbuffer.opcode(tree, schema.BuiltinOperator.DEQUANTIZE, 2) if how != "hybrid" else None
    done = left = 0
    for graph in tree.subgraphs:
        operators = []
        for op in graph.operators:
            weights = _float_weights(tree, graph, op, holders) if op.opcodeIndex == lstm else None
            if op.opcodeIndex == lstm and not weights:
                left += graph.tensors[op.inputs[WEIGHTS[0]]].type == schema.TensorType.FLOAT32
            if weights:
                done += 1
                if how == "hybrid":
                    for tensor in weights:
                        _store(tree, tensor, "int8")
                    op.builtinOptions.asymmetricQuantizeInputs = True
                else:
                    operators += [_dequantized(tree, graph, op, position, how, dequantize) for position in WEIGHTS]
            operators.append(op)
        graph.operators = operators
    if done:
        flatbuffer.write(tree, outside, path)
    return done, left


def _float_weights(tree, graph, op, holders) -> list | None:
    """The op's eight weight tensors, where all are float32 constants no other tensor shares and the
    op has no peephole or projection weights; else None."""
    from ai_edge_litert import schema_py_generated as schema

    inputs = list(op.inputs)
    if any(position < len(inputs) and inputs[position] >= 0 for position in _OPTIONAL_WEIGHTS):
        return None
    if len(inputs) <= max(WEIGHTS) or min(inputs[p] for p in WEIGHTS) < 0:
        return None
    tensors = [graph.tensors[inputs[p]] for p in WEIGHTS]
    for tensor in tensors:
        data = tree.buffers[tensor.buffer].data
        if tensor.type != schema.TensorType.FLOAT32 or data is None or len(data) == 0 \
                or holders[tensor.buffer] != 1:
            return None
    return tensors


def _store(tree, tensor, how: str) -> None:
    """*tensor*'s float32 constant as int8 (symmetric, one scale: what the LSTM kernel reads) or float16."""
    from ai_edge_litert import schema_py_generated as schema

    buffer = tree.buffers[tensor.buffer]
    values = np.frombuffer(bytes(buffer.data), np.float32)
    if how == "float16":
        stored, tensor.type = values.astype(np.float16), schema.TensorType.FLOAT16
    else:
        scale = float(np.abs(values).max()) / 127 or 1.0
        stored, tensor.type = np.clip(np.round(values / scale), -127, 127).astype(np.int8), schema.TensorType.INT8
        tensor.quantization = schema.QuantizationParametersT()
        tensor.quantization.scale, tensor.quantization.zeroPoint = [scale], [0]
    buffer.data = np.frombuffer(stored.tobytes(), np.uint8)


def _dequantized(tree, graph, op, position: int, how: str, dequantize: int):
    """A DEQUANTIZE giving *op* the weight at *position* in float32, its constant stored *how*."""
    from ai_edge_litert import schema_py_generated as schema

    constant = graph.tensors[op.inputs[position]]
    weight = schema.TensorT()
    weight.shape, weight.type, weight.buffer = list(constant.shape), schema.TensorType.FLOAT32, 0
    weight.name = (constant.name or b"lstm_weight") + b"_dequantized"
    _store(tree, constant, how)
    graph.tensors.append(weight)
    unpack = schema.OperatorT()
    unpack.opcodeIndex, unpack.inputs, unpack.outputs = dequantize, [op.inputs[position]], [len(graph.tensors) - 1]
    op.inputs[position] = len(graph.tensors) - 1
    return unpack
