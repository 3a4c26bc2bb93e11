"""Float32 inputs and outputs for a fully int8 TFLite model, as the user's code and health checks
feed and read the float model's."""

from __future__ import annotations

from collections import Counter

from host_tools.compress.tflite import flatbuffer


def float_io(tree) -> int:
    """Give *tree*'s main graph float32 inputs and outputs where they are 8-bit quantized: a float
    twin of each such tensor takes its place (and its name, in the signature too), converted by a
    QUANTIZE in front of the graph or a DEQUANTIZE behind it. Returns how many were wrapped."""
    from ai_edge_litert import schema_py_generated as schema

    graph = tree.subgraphs[0]
    eight_bit = (schema.TensorType.INT8, schema.TensorType.UINT8)
    twins: dict[int, int] = {}

    def wrap(index: int, op_code: int, before: bool) -> int:
        tensor = graph.tensors[index]
        twin = schema.TensorT()
        twin.shape, twin.shapeSignature, twin.hasRank = tensor.shape, tensor.shapeSignature, tensor.hasRank
        twin.type, twin.name = schema.TensorType.FLOAT32, tensor.name
        tensor.name = (tensor.name or b"") + b"_int8"
        tree.buffers.append(schema.BufferT())  # (computed: no data)
        twin.buffer = len(tree.buffers) - 1
        graph.tensors.append(twin)
        twins[index] = len(graph.tensors) - 1
        op = schema.OperatorT()
        op.opcodeIndex = flatbuffer.opcode(tree, op_code, 2)  # (version 2: int8)
        op.inputs, op.outputs = ([twins[index]], [index]) if before else ([index], [twins[index]])
        if before:
            graph.operators.insert(0, op)
        else:
            graph.operators.append(op)
        return twins[index]

    def quantized(index: int) -> bool:
        tensor = graph.tensors[index]
        return (tensor.type in eight_bit and tensor.quantization is not None
                and tensor.quantization.scale is not None and len(tensor.quantization.scale) == 1)

    graph.inputs = [wrap(t, schema.BuiltinOperator.QUANTIZE, True) if quantized(t) else t for t in graph.inputs]
    graph.outputs = [wrap(t, schema.BuiltinOperator.DEQUANTIZE, False) if quantized(t) and t not in twins else
                     twins.get(t, t) for t in graph.outputs]
    for signature in tree.signatureDefs or []:
        if signature.subgraphIndex == 0:
            for entry in [*(signature.inputs or []), *(signature.outputs or [])]:
                entry.tensorIndex = twins.get(entry.tensorIndex, entry.tensorIndex)
    return len(twins)


def without_round_trips(tree) -> int:
    """Drop each QUANTIZE of a float32 value whose 8-bit result only a DEQUANTIZE reads, where that
    DEQUANTIZE gives a model output: the output is the float value itself, under its name (in the
    signature too). litert-quantizer puts such a pair after an op it leaves float, as a detector's
    TFLite_Detection_PostProcess, and the pair only rounds the boxes, scores and classes to 8 bits.
    Returns how many outputs it freed."""
    from ai_edge_litert import schema_py_generated as schema

    graph = tree.subgraphs[0]
    kinds = [max(code.builtinCode, code.deprecatedBuiltinCode) for code in tree.operatorCodes]
    maker = {t: op for op in graph.operators for t in op.outputs}
    readers = Counter(t for op in graph.operators for t in op.inputs)
    outputs, freed, dropped = list(graph.outputs), {}, set()
    for position, out in enumerate(outputs):
        dequantize = maker.get(out)
        if dequantize is None or kinds[dequantize.opcodeIndex] != schema.BuiltinOperator.DEQUANTIZE or readers[out]:
            continue
        rounded = dequantize.inputs[0]
        quantize = maker.get(rounded)
        if quantize is None or kinds[quantize.opcodeIndex] != schema.BuiltinOperator.QUANTIZE \
                or readers[rounded] != 1 or rounded in outputs:
            continue
        value = quantize.inputs[0]
        if graph.tensors[value].type != schema.TensorType.FLOAT32 or value in outputs or value in graph.inputs:
            continue
        graph.tensors[value].name, graph.tensors[out].name = graph.tensors[out].name, graph.tensors[value].name
        outputs[position], freed[out] = value, value
        dropped |= {id(quantize), id(dequantize)}
    graph.operators = [op for op in graph.operators if id(op) not in dropped]
    graph.outputs = outputs
    for signature in tree.signatureDefs or []:
        if signature.subgraphIndex == 0:
            for entry in signature.outputs or []:
                entry.tensorIndex = freed.get(entry.tensorIndex, entry.tensorIndex)
    return len(freed)
