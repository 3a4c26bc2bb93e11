"""Which channels of an ONNX graph can be removed, and removing them.

A prunable *layer* is a Conv (not grouped), Gemm or MatMul with a constant weight. Its output
channels can go when everything computed from its output, up to the next weighted layers, treats
channels independently — its *region*: activations (also those written out as several ops, like
GELU's x·(1 + erf(x/√2))/2 or SiLU's x·sigmoid(x)), depthwise convolutions, pooling,
BatchNormalization, scalar or per-channel constants added, multiplied and so on, and between a
convolution and a fully connected layer a Flatten or a GlobalAveragePool. The region must end
only in weighted layers that read it as their data input. Removing output channel c of the layer
then means removing input channel c of each of those readers (or its c-th block of flattened
features), entry c of every per-channel constant in the region and channel c of its depthwise
convolutions. Anything else — the region meeting another branch (a residual Add), a Concat, a
Reshape, a graph output, a grouped conv that is not depthwise — leaves the layer alone, and the
plan records why.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from host_tools.compress.onnx.boundary import consumers

# Elementwise ops of one data input (any other inputs are constants, e.g. Clip's bounds).
UNARY_OPS = {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "Elu", "HardSigmoid", "HardSwish", "Selu", "Softplus",
             "Softsign", "Identity", "Dropout", "Erf", "Exp", "Neg", "Abs", "Sqrt", "Reciprocal", "Gelu", "Mish",
             "Celu", "ThresholdedRelu"}
BINARY_OPS = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"}
POOL_OPS = {"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool"}
WEIGHTED_OPS = {"Conv", "Gemm", "MatMul"}


@dataclass
class Reader:
    """A weighted layer that reads a pruned layer's channels as its input channels."""
    node: str
    weight: str
    axis: int  # the weight's input-channel axis
    block: int = 1  # flattened features per channel at this reader (H*W after a Flatten)


@dataclass
class Layer:
    producer: str  # node name
    weight: str
    axis: int  # the weight's output-channel axis
    channels: int
    params: list[tuple[str, int]] = field(default_factory=list)  # per-channel constants in the region: (name, axis)
    readers: list[Reader] = field(default_factory=list)
    depthwise: list[str] = field(default_factory=list)  # depthwise convs in the region: their group = channels


@dataclass(frozen=True)
class Layout:
    """Where a region tensor keeps the layer's channels: axis 1 of a feature map ("map"), or the
    last axis ("vec"), in blocks of *block* features after a Flatten."""
    kind: str
    rank: int | None
    block: int = 1


@dataclass
class Plan:
    layers: list[Layer]
    skipped: dict[str, str]  # node name -> why its channels stay

    def why_none(self) -> str:
        reasons = Counter(self.skipped.values())
        return "; ".join(f"{n} x {why}" for why, n in reasons.most_common(3)) or "no Conv, Gemm or MatMul"


@dataclass
class _Graph:
    nodes: list
    consts: dict  # initializer name -> TensorProto
    shapes: dict[str, list]
    uses: Counter
    outputs: set[str]
    readers: dict[str, list]


def plan_channel_pruning(proto, exclude: set[str]) -> Plan:
    """Constants must be initializers (``boundary.hoist_constants``) to be seen as constants."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(proto)
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    graph = proto.graph
    g = _Graph(list(graph.node), {i.name: i for i in graph.initializer}, shapes,
               Counter(name for node in graph.node for name in node.input), {o.name for o in graph.output},
               consumers(graph))
    layers, skipped = [], {}
    for index, node in enumerate(g.nodes):
        out_axis = _output_axis(node, g.consts)
        if out_axis is None:
            continue
        if node.name in exclude:
            skipped[node.name] = "excluded"
            continue
        weight = node.input[1]
        if g.uses[weight] > 1:
            skipped[node.name] = "weight shared with another node"
            continue
        layer = Layer(node.name, weight, out_axis, int(g.consts[weight].dims[out_axis]))
        if node.op_type in ("Conv", "Gemm") and len(node.input) > 2 and node.input[2]:
            layer.params.append((node.input[2], 0))
        why = _walk_region(index, layer, g)
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
    if node.op_type == "Conv" and len(dims) >= 3 and _attr(node, "group", 1) == 1:
        return 0
    if node.op_type == "Gemm" and len(dims) == 2 and _attr(node, "transA", 0) == 0:
        return 0 if _attr(node, "transB", 0) else 1
    if node.op_type == "MatMul" and len(dims) == 2:
        return 1
    return None


def _walk_region(index: int, layer: Layer, g: _Graph) -> str | None:
    """Follow the layer's output through its region (the graph is in topological order); fill
    *layer*'s params and readers; return why its channels must stay, or None."""
    node = g.nodes[index]
    if node.op_type == "Conv":
        start = Layout("map", len(g.consts[node.input[1]].dims))
    else:
        shape = g.shapes.get(node.output[0])
        start = Layout("vec", 2 if node.op_type == "Gemm" else (len(shape) if shape else None))
    region: dict[str, Layout] = {}
    waiting = 0  # reads of region tensors not yet visited

    def enter(tensor: str, layout: Layout) -> str | None:
        nonlocal waiting
        if tensor in g.outputs:
            return "its output is a graph output"
        region[tensor] = layout
        waiting += len(g.readers.get(tensor, []))
        return None

    why = enter(node.output[0], start)
    for nxt in g.nodes[index + 1:]:
        if why or not waiting:
            break
        inside = [name for name in nxt.input if name in region]
        if inside:
            waiting -= len(inside)
            why = _step(nxt, region, layer, g, enter)
    if why:
        return why
    return None if layer.readers else "no weighted layer reads its output"


def _step(node, region: dict[str, Layout], layer: Layer, g: _Graph, enter) -> str | None:
    op, data = node.op_type, node.input[0]
    if op == "Conv" and _depthwise(node, layer, g):
        return _through_depthwise(node, region, layer, g, enter)
    if op in WEIGHTED_OPS:
        return _reader(node, region, layer, g)
    if op in BINARY_OPS:
        layout = region[next(name for name in node.input if name in region)]
        for name in node.input:
            if name in region:
                if region[name] != layout:
                    return f"{op} of its output in two layouts"
            elif name not in g.consts:
                return f"its output meets another branch at {op} (a residual connection or a gate)"
            elif not _per_channel_const(name, layout, layer, g):
                return f"{op} with a constant that is not per channel"
        return enter(node.output[0], layout)
    if data not in region:
        return f"its output is an extra input of {op}"
    layout = region[data]
    if op not in UNARY_OPS | POOL_OPS | {"PRelu", "BatchNormalization", "Flatten"}:
        return f"its output feeds {op}"
    if any(name in region or (name and name not in g.consts) for name in node.input[1:]):
        return f"{op} with an input that is not a constant"
    if op in UNARY_OPS:
        if not all(_scalar(g.consts[name]) for name in node.input[1:] if name):
            return f"{op} with bounds that are not scalars"
        return enter(node.output[0], layout)
    if op == "PRelu":
        return enter(node.output[0], layout) if _per_channel_const(node.input[1], layout, layer, g) else \
            "PRelu slope is not per channel"
    if op == "BatchNormalization" and (layout.kind == "map" or (layout.rank == 2 and layout.block == 1)):
        if any(g.uses[name] > 1 for name in node.input[1:5]):
            return "BatchNormalization parameters shared with another node"
        layer.params.extend((name, 0) for name in node.input[1:5])
        return enter(node.output[0], layout)
    if op in POOL_OPS and layout.kind == "map":
        return enter(node.output[0], layout)
    if op == "Flatten" and layout.kind == "map" and _attr(node, "axis", 1) == 1:
        shape = g.shapes.get(data)
        if not shape or None in shape[2:]:
            return "unknown spatial size before Flatten"
        return enter(node.output[0], Layout("vec", 2, int(np.prod(shape[2:], dtype=np.int64))))
    return f"{op} across its channels"


def _depthwise(node, layer: Layer, g: _Graph) -> bool:
    """A convolution of each channel on its own (MobileNet's 3x3s): it keeps channels apart."""
    weight = g.consts.get(node.input[1]) if len(node.input) > 1 else None
    return (weight is not None and _attr(node, "group", 1) == layer.channels == weight.dims[0]
            and weight.dims[1] == 1)


def _through_depthwise(node, region: dict[str, Layout], layer: Layer, g: _Graph, enter) -> str | None:
    layout = region.get(node.input[0])
    if layout is None or any(name in region for name in node.input[1:]) or layout.kind != "map":
        return "consumed by a depthwise Conv it cannot shrink"
    if any(g.uses[name] > 1 for name in node.input[1:] if name):
        return "depthwise Conv weight shared with another node"
    layer.params.extend((name, 0) for name in node.input[1:] if name)
    layer.depthwise.append(node.name)
    return enter(node.output[0], layout)


def _reader(node, region: dict[str, Layout], layer: Layer, g: _Graph) -> str | None:
    op = node.op_type
    axis = _output_axis(node, g.consts)
    if axis is None or node.input[0] not in region or any(name in region for name in node.input[1:]):
        return f"consumed by a {op} it cannot shrink"
    layout = region[node.input[0]]
    if op == "Conv" and (layout.kind != "map" or layout.rank != len(g.consts[node.input[1]].dims)):
        return "a convolution after a fully connected layer or a flatten"
    if op != "Conv" and layout.kind == "map":
        return f"{op} applied to a feature map"
    if op == "Gemm" and layout.rank != 2:
        return "Gemm of a tensor that is not 2-D"
    if g.uses[node.input[1]] > 1:
        return "consumer weight shared with another node"
    layer.readers.append(Reader(node.name, node.input[1], 1 if op == "Conv" else 1 - axis, layout.block))
    return None


def _scalar(init) -> bool:
    return int(np.prod(list(init.dims) or [1])) == 1


def _per_channel_const(name: str, layout: Layout, layer: Layer, g: _Graph) -> bool:
    """A scalar, or one value per channel broadcast along the layout's channel axis; the latter is
    recorded for slicing (it must belong to this region alone)."""
    init = g.consts[name]
    if _scalar(init):
        return True
    dims = list(init.dims)
    if g.uses[name] > 1 or layout.block != 1:
        return False
    if layout.kind == "map":
        rank = layout.rank or 0
        axis = 1 - (rank - len(dims))  # the param's own axis lined up with the map's axis 1
        if len(dims) > rank or axis < 0:
            return False
    else:
        axis = len(dims) - 1
    if dims[axis] != layer.channels or any(d != 1 for i, d in enumerate(dims) if i != axis):
        return False
    layer.params.append((name, axis))
    return True


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
        for reader in layer.readers:
            features = (keep[:, None] * reader.block + np.arange(reader.block)[None, :]).ravel()
            arrays[reader.weight] = np.take(array(reader.weight), features, axis=reader.axis)
        for node in proto.graph.node:
            if node.name in layer.depthwise:
                next(a for a in node.attribute if a.name == "group").i = len(keep)
    for name, value in arrays.items():
        inits[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value), name))
    # Shapes recorded for intermediate tensors are stale now; runtimes infer them again.
    del proto.graph.value_info[:]


def _attr(node, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return a.i
    return default
