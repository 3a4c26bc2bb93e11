"""Which channels of an ONNX graph can be removed, and removing them.

A prunable *layer* is a Conv (not grouped), Gemm or MatMul with a constant weight whose output
reaches exactly one weighted consumer through operations that treat channels independently
(activations, pooling, BatchNormalization, a per-channel bias Add/Mul) and, between a
convolution and a fully connected layer, a Flatten or a GlobalAveragePool. Removing output
channel c of the layer then means removing input channel c of the consumer (or its c-th
block of flattened features) and entry c of every per-channel parameter on the way.
Anything else — a residual Add, a Concat, two consumers, a graph output, a grouped conv — is
left alone, and the plan records why.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from host_tools.compress.onnx.boundary import consumers

CHANNELWISE_OPS = {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "Elu", "HardSigmoid", "HardSwish", "Selu",
                   "Softplus", "Identity", "Dropout", "MaxPool", "AveragePool", "PRelu"}


@dataclass
class Layer:
    producer: str  # node name
    weight: str
    axis: int  # the weight's output-channel axis
    channels: int
    params: list[tuple[str, int]] = field(default_factory=list)  # per-channel tensors on the way: (name, axis)
    consumer: str = ""
    consumer_weight: str = ""
    consumer_axis: int = 1
    block: int = 1  # flattened features per channel at the consumer (H*W after a Flatten)


@dataclass
class Plan:
    layers: list[Layer]
    skipped: dict[str, str]  # node name -> why its channels stay

    def why_none(self) -> str:
        reasons = Counter(self.skipped.values())
        return "; ".join(f"{n} x {why}" for why, n in reasons.most_common(3)) or "no Conv, Gemm or MatMul"


def plan_channel_pruning(proto, exclude: set[str]) -> Plan:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(proto)
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    readers = consumers(graph)
    uses = Counter(name for node in graph.node for name in node.input)
    outputs = {o.name for o in graph.output}
    layers, skipped = [], {}
    for node in graph.node:
        out_axis = _output_axis(node, inits)
        if out_axis is None:
            continue
        if node.name in exclude:
            skipped[node.name] = "excluded"
            continue
        weight = node.input[1]
        if uses[weight] > 1:
            skipped[node.name] = "weight shared with another node"
            continue
        layer = Layer(node.name, weight, out_axis, int(inits[weight].dims[out_axis]))
        if node.op_type in ("Conv", "Gemm") and len(node.input) > 2 and node.input[2]:
            layer.params.append((node.input[2], 0))
        why = _follow(node, layer, readers, inits, uses, outputs, shapes)
        if why:
            skipped[node.name] = why
        elif layer.channels < 2:
            skipped[node.name] = "a single channel"
        else:
            layers.append(layer)
    return Plan(layers, skipped)


def _output_axis(node, inits) -> int | None:
    if len(node.input) < 2 or node.input[1] not in inits:
        return None
    dims = list(inits[node.input[1]].dims)
    if node.op_type == "Conv" and len(dims) == 4 and _attr(node, "group", 1) == 1:
        return 0
    if node.op_type == "Gemm" and len(dims) == 2 and _attr(node, "transA", 0) == 0:
        return 0 if _attr(node, "transB", 0) else 1
    if node.op_type == "MatMul" and len(dims) == 2:
        return 1
    return None


def _input_axis(node, inits) -> int | None:
    """The consumer weight's input-channel axis, or None if it cannot take pruned inputs."""
    axis = _output_axis(node, inits)
    if axis is None:
        return None
    if node.op_type == "Conv":
        return 1
    return 1 - axis


def _follow(node, layer: Layer, readers, inits, uses, outputs, shapes) -> str | None:
    """Walk from *node*'s output to the one weighted consumer; fill *layer*; return why not."""
    tensor = node.output[0]
    flattened_from = None
    while True:
        if tensor in outputs:
            return "its output is a graph output"
        nexts = readers.get(tensor, [])
        if len(nexts) != 1:
            return "its output has several consumers (e.g. a residual connection)" if nexts else "unused output"
        nxt = nexts[0]
        op = nxt.op_type
        if op in CHANNELWISE_OPS:
            if op == "PRelu" and not _per_channel_param(nxt.input[1], inits, layer, flattened_from):
                return "PRelu slope is not per channel"
        elif op == "BatchNormalization":
            if not all(n in inits and uses[n] == 1 for n in nxt.input[1:5]):
                return "BatchNormalization parameters are not constants"
            layer.params.extend((n, 0) for n in nxt.input[1:5])
        elif op in ("Add", "Mul", "Sub", "Div") and nxt.input[0] == tensor and nxt.input[1] in inits:
            if not _per_channel_param(nxt.input[1], inits, layer, flattened_from, uses):
                return f"{op} with a constant that is not per channel"
        elif op in ("Flatten", "GlobalAveragePool") and node.op_type == "Conv" and flattened_from is None:
            if op == "Flatten" and _attr(nxt, "axis", 1) != 1:
                return "Flatten on another axis"
            shape = shapes.get(tensor)
            if op == "Flatten":
                if not shape or len(shape) != 4 or None in shape[2:]:
                    return "unknown spatial size before Flatten"
                layer.block = int(shape[2] * shape[3])
            flattened_from = op
        elif op in ("Conv", "Gemm", "MatMul"):
            axis = _input_axis(nxt, inits)
            if axis is None or nxt.input[0] != tensor:
                return f"consumed by a {op} it cannot shrink"
            if op == "Conv" and (node.op_type != "Conv" or flattened_from):
                return "a convolution after a flatten"
            if op != "Conv" and node.op_type == "Conv" and not flattened_from:
                return f"{op} applied to a feature map"
            if uses[nxt.input[1]] > 1:
                return "consumer weight shared with another node"
            layer.consumer, layer.consumer_weight, layer.consumer_axis = nxt.name, nxt.input[1], axis
            return None
        else:
            return f"its output feeds {op}"
        tensor = nxt.output[0]


def _per_channel_param(name: str, inits, layer: Layer, flattened_from, uses=None) -> bool:
    """A constant with one value per channel (rank 1 for dense layers, [C,1,1] for feature maps)."""
    dims = list(inits[name].dims)
    if uses is not None and uses[name] > 1:
        return False
    if int(np.prod(dims or [1])) == 1:
        return True  # a scalar applies to every channel alike: nothing to prune
    if dims and dims[0] == layer.channels and all(d == 1 for d in dims[1:]) and len(dims) in (1, 3):
        layer.params.append((name, 0))
        return True
    if dims and dims[-1] == layer.channels and len(dims) == 1:
        layer.params.append((name, 0))
        return True
    return False


def prune_channels(proto, plan: Plan, ratio: float, criterion: str) -> None:
    """Remove *ratio* of each planned layer's channels, the least important by weight norm."""
    from onnx import numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    arrays: dict[str, np.ndarray] = {}

    def array(name: str) -> np.ndarray:
        if name not in arrays:
            arrays[name] = numpy_helper.to_array(inits[name])
        return arrays[name]

    for layer in plan.layers:
        weight = array(layer.weight)
        moved = np.moveaxis(weight, layer.axis, 0).reshape(layer.channels, -1)
        score = np.abs(moved).sum(axis=1) if criterion == "l1" else np.sqrt((moved ** 2).sum(axis=1))
        keep_count = max(1, int(round(layer.channels * (1 - ratio))))
        keep = np.sort(np.argsort(-score, kind="stable")[:keep_count])
        arrays[layer.weight] = np.take(weight, keep, axis=layer.axis)
        for name, axis in layer.params:
            if array(name).ndim and array(name).shape[axis] == layer.channels:
                arrays[name] = np.take(array(name), keep, axis=axis)
        features = (keep[:, None] * layer.block + np.arange(layer.block)[None, :]).ravel()
        arrays[layer.consumer_weight] = np.take(array(layer.consumer_weight), features, axis=layer.consumer_axis)
    for name, value in arrays.items():
        inits[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value), name))
    # Shapes recorded for intermediate tensors are stale now; runtimes infer them again.
    del proto.graph.value_info[:]


def _attr(node, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return a.i
    return default
