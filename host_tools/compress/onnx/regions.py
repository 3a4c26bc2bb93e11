"""A weighted layer's *region*: what is computed from its output, channel by channel, up to the
weighted layers that read it (see ``channels`` for how regions become pruning groups).

The walk follows the graph in topological order from the layer's output through ops that treat
channels independently — activations (also those written out as several ops, like GELU's
x·(1 + erf(x/√2))/2 or SiLU's x·sigmoid(x)), depthwise convolutions, pooling, upsampling and
spatial reductions, BatchNormalization and LayerNormalization, scalar or per-channel constants
added, multiplied and so on, tensors that are the same for every channel (a token mask), a
Concat with other channels (the region goes on at its offsets in the joined tensor), between a
convolution and a fully connected layer a Flatten or a GlobalAveragePool, and Shapes read for
anything but the channel count (``shape_reads``) — and records the per-channel constants on the
way, the depthwise convolutions, the weighted layers that read the region (its *readers*) and where
it meets a tensor from another branch (a residual Add, a squeeze-and-excitation gate's Mul), which
only another layer's region can explain. A Reshape that splits the channels into attention heads
hands the walk to ``heads``; the ops that move channels without changing them (Transpose, Concat,
Split…) are in ``moves``. Anything else stops the walk with the reason.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from host_tools.compress.onnx import heads, map_reshapes, moves, shape_reads
from host_tools.compress.onnx.layout import (BINARY_OPS, POOL_OPS, REDUCE_OPS, UNARY_OPS, WEIGHTED_OPS, Graph, Layout,
                                             Param, Reader, Region, attr, axes_of, const_array, is_scalar)


def weight_of(node) -> str:
    """The input that holds a layer's weight: an embedding table is a Gather's first input."""
    return node.input[0] if node.op_type == "Gather" else node.input[1] if len(node.input) > 1 else ""


def output_axis(node, consts) -> int | None:
    """The output-channel axis of a weighted node's constant weight (an embedding table's last);
    None if it has none we can prune."""
    if weight_of(node) not in consts:
        return None
    dims = list(consts[weight_of(node)].dims)
    if node.op_type == "Gather":
        return 1 if len(dims) == 2 and attr(node, "axis", 0) == 0 else None
    if node.op_type == "Conv" and len(dims) >= 3 and not _is_depthwise_weight(node, dims):
        return 0 if dims[0] % attr(node, "group", 1) == 0 else None
    if node.op_type == "Gemm" and len(dims) == 2 and attr(node, "transA", 0) == 0:
        return 0 if attr(node, "transB", 0) else 1
    if node.op_type == "MatMul" and len(dims) == 2:
        return 1
    return None


def _is_depthwise_weight(node, dims: list[int]) -> bool:
    """A convolution of each channel on its own: walked through as part of the region it reads,
    never a layer of its own."""
    return attr(node, "group", 1) == dims[0] > 1 and dims[1] == 1


def walk_region(index: int, channels: int, g: Graph, window: tuple[int, int] | None = None,
                coarse: int = 1) -> Region:
    """The region of the weighted node ``g.nodes[index]`` (its output has *channels* channels), or
    of the *window* (start, size) of them that one part of a Split takes; where the channels are
    split into attention heads, *coarse* heads at a time make one unit."""
    node = g.nodes[index]
    offsets = (window[0],) if window else (0,)
    region = Region(window[1] if window else channels, out_offsets=offsets, coarse=coarse)
    if node.op_type == "Conv" and attr(node, "group", 1) > 1:
        region.segments = attr(node, "group", 1)
        if window:
            region.why = "a Split of a grouped Conv's channels"
            return region
    bias = node.input[2] if node.op_type in ("Conv", "Gemm") and len(node.input) > 2 else ""
    if bias and bias not in g.consts:
        region.why = "its bias is not a constant"
        return region
    if bias and int(np.prod(list(g.consts[bias].dims) or [1])) > 1:  # [C], or Gemm's [1, C]
        region.params[bias] = Param(len(g.consts[bias].dims) - 1, offsets)
    if node.op_type == "Conv":
        start = Layout("map", len(g.consts[node.input[1]].dims))
    else:
        shape = g.shapes.get(node.output[0])
        start = Layout("vec", 2 if node.op_type == "Gemm" else (len(shape) if shape else None))
    if window:
        start = replace(start, offsets=offsets, width=channels)
    waiting = 0  # reads of region tensors not yet visited

    def enter(tensor: str, layout: Layout) -> str | None:
        nonlocal waiting
        if tensor in g.outputs:
            return "its output is a graph output"
        region.tensors[tensor] = layout
        waiting += len(g.readers.get(tensor, []))
        return None

    why = enter(node.output[0], start)
    for nxt in g.nodes[index + 1:]:
        if why or not waiting:
            break
        inside = [name for name in nxt.input if name in region.tensors]
        if inside:
            waiting -= len(inside)
            why = _step(nxt, region, g, enter)
    if not why and not all(_same_channels(region.tensors.get(tensor), region.tensors[source])
                           for tensor, source in region.same_channels):
        why = "its channel count is read (Shape)"  # for a tensor that does not keep its channels
    region.why = why or (None if region.readers else "no weighted layer reads its output")
    return region


def _same_channels(layout: Layout | None, source: Layout) -> bool:
    """Whether a tensor holds the channels as *source* does: the same layout, of any rank where the
    channels are last (or on axis 1 of a feature map)."""
    if layout is None:
        return False
    if layout.kind in ("vec", "map"):
        return replace(layout, rank=None) == replace(source, rank=None)
    return layout == source


def _step(node, region: Region, g: Graph, enter) -> str | None:
    """Take *node*, which reads a region tensor, into the region; or say why it cannot be."""
    op, tensors = node.op_type, region.tensors
    if op == "Shape":
        return shape_reads.step(node, tensors[node.input[0]], region, g)
    if any(tensors[name].kind == "heads" for name in node.input if name in tensors):
        return heads.step(node, region, g, enter)
    if op == "Reshape" and node.input[0] in tensors and tensors[node.input[0]].kind == "vec":
        return heads.split(node, region, g, enter)
    if op == "Reshape" and node.input[0] in tensors and tensors[node.input[0]].kind == "map":
        normalized = _group_norm(node, tensors[node.input[0]], region, g)
        if normalized:
            return enter(normalized, tensors[node.input[0]])
        if moves.flattens(node, tensors[node.input[0]], g):
            return moves.flatten(node, tensors[node.input[0]], region, g, enter)
        return map_reshapes.spatial(node, tensors[node.input[0]], region, g, enter)
    if op == "Conv" and node.input[0] in tensors and _depthwise(node, tensors[node.input[0]], region, g):
        return _through_depthwise(node, region, g, enter)
    if op in WEIGHTED_OPS:
        return _reader(node, region, g)
    if op == "Concat":
        return moves.concat(node, region, g, enter)
    if op == "Split" and node.input[0] in tensors and not any(name in tensors for name in node.input[1:]):
        return moves.split(node, region, g, enter)
    if op in BINARY_OPS:
        return _through_binary(node, region, g, enter)
    if op == "Transpose" and tensors[node.input[0]].kind in ("map", "vec"):
        return moves.transpose(node, tensors[node.input[0]], enter)
    if op in ("Slice", "Pad") and node.input[0] in tensors and tensors[node.input[0]].kind in ("map", "vec") and \
            not any(name in tensors for name in node.input[1:]):
        return moves.other_axes(node, tensors[node.input[0]], g, enter)
    if op not in UNARY_OPS | POOL_OPS | REDUCE_OPS | {"PRelu", "BatchNormalization", "InstanceNormalization",
                                                      "LayerNormalization", "Flatten", "Resize", "Gather"}:
        return f"its output feeds {op}"
    if node.input[0] not in tensors:
        return f"its output is an extra input of {op}"
    if op == "Resize" and not any(name in tensors for name in node.input[1:]) and \
            all(not name or name in g.consts for name in node.input[1:3]) and \
            map_reshapes.resized_whole(node, tensors[node.input[0]], g):
        return enter(node.output[0], tensors[node.input[0]])
    if any(name in tensors or (name and name not in g.consts) for name in node.input[1:]):
        return f"{op} with an input that is not a constant"
    return _through_one_input(node, region, g, enter)


def _through_binary(node, region: Region, g: Graph, enter) -> str | None:
    """Add, Mul…: with constants (scalar or per channel), with the region itself (x·sigmoid(x)), with
    a tensor that is the same for every channel (a [batch, tokens, 1] mask), or with another branch,
    which only a layer whose channels are tied to these can explain."""
    op, tensors = node.op_type, region.tensors
    layout = tensors[next(name for name in node.input if name in tensors)]
    for name in node.input:
        if name in tensors:
            if tensors[name] != layout:
                return f"{op} of its output in two layouts"
        elif name not in g.consts:
            if _across_channels(g.shapes.get(name), layout):
                continue
            if layout.width is not None:
                return f"its output meets another branch at {op} after a Concat"
            region.meets.append((name, layout, op))
        elif not _per_channel_const(name, layout, region, g):
            return f"{op} with a constant that is not per channel"
    return enter(node.output[0], layout)


def _across_channels(shape: list | None, layout: Layout) -> bool:
    """Whether a tensor of *shape* broadcasts along the layout's channel axis (one value for all)."""
    if shape is None or layout.rank is None or len(shape) > layout.rank:
        return False
    position = (1 if layout.kind == "map" else layout.rank - 1) - (layout.rank - len(shape))
    return position < 0 or shape[position] == 1


def _through_one_input(node, region: Region, g: Graph, enter) -> str | None:
    """Ops of one data input (the others constants) that keep channels apart."""
    op, data = node.op_type, node.input[0]
    layout = region.tensors[data]
    if op in UNARY_OPS:
        if not all(is_scalar(g.consts[name]) for name in node.input[1:] if name):
            return f"{op} with bounds that are not scalars"
        return enter(node.output[0], layout)
    if op == "PRelu":
        return enter(node.output[0], layout) if _per_channel_const(node.input[1], layout, region, g) else \
            "PRelu slope is not per channel"
    if op == "BatchNormalization" and (layout.kind == "map" or (layout.rank == 2 and layout.block == 1)):
        if not all([region.cut(name, Param(0, layout.offsets)) for name in node.input[1:5]]):
            return "BatchNormalization parameters read again in other places"
        return enter(node.output[0], layout)
    if op == "InstanceNormalization" and layout.kind == "map" and layout.block == 1:
        # each channel normalised over its own positions (PyTorch's GroupNorm with a group per channel,
        # as wav2vec2's feature encoder exports it)
        if not all([region.cut(name, Param(0, layout.offsets)) for name in node.input[1:3]]):
            return "InstanceNormalization parameters read again in other places"
        return enter(node.output[0], layout)
    if op == "LayerNormalization" and layout.kind == "vec" and layout.rank and \
            attr(node, "axis", -1) % layout.rank == layout.rank - 1:
        return _through_layer_norm(node, layout, region, g, enter)
    if op in POOL_OPS and layout.kind == "map":
        return enter(node.output[0], layout)
    if op == "Gather" and layout.kind == "vec" and layout.rank and \
            attr(node, "axis", 0) % layout.rank < layout.rank - 1:  # rows: a pooler's first token
        return enter(node.output[0], replace(layout, rank=layout.rank + len(g.consts[node.input[1]].dims) - 1))
    if op == "Resize" and layout.kind == "map":
        scales = node.input[2] if len(node.input) > 2 else ""
        if len(node.input) > 3 and node.input[3] or not scales or const_array(g.consts[scales])[:2].tolist() != [1, 1]:
            return "Resize that is not by spatial scales"
        return enter(node.output[0], layout)  # upsampling: each channel on its own
    if op in REDUCE_OPS and (layout.kind == "map" or layout.rank):
        return _through_reduce(node, layout, g, enter)
    if op == "Flatten" and layout.kind == "map" and attr(node, "axis", 1) == 1:
        shape = g.shapes.get(data)
        if not shape or None in shape[2:]:
            return "unknown spatial size before Flatten"
        block = int(np.prod(shape[2:], dtype=np.int64))
        return enter(node.output[0], replace(layout, kind="vec", rank=2, block=block))
    if op == "Flatten" and layout.kind == "vec" and layout.rank and \
            attr(node, "axis", 1) % layout.rank == layout.rank - 1:
        # tokens flattened into one batch of vectors, the channels still last (LeViT's BatchNorm1d)
        return enter(node.output[0], replace(layout, rank=2))
    return f"{op} across its channels"


def _through_reduce(node, layout: Layout, g: Graph, enter) -> str | None:
    """A mean (or max, sum…) over the spatial axes only, as squeeze-and-excitation blocks take it;
    or over a vector's leading axes (a transformer's mean over its tokens)."""
    rank = layout.rank or 0
    axes = axes_of(node, g.consts)
    axes = sorted(a % rank for a in axes) if rank else axes
    channel_axis = 1 if layout.kind == "map" else rank - 1
    if axes == [channel_axis] and node.op_type == "ReduceMean" and attr(node, "keepdims", 1) and \
            layout.kind == "vec" and layout.block == 1 and layout.offsets == (0,) and layout.width is None:
        # A mean over the channels, one value per token (RMSNorm's mean square, a LayerNorm written
        # out): what reads it takes it as a value the same for every channel. From the channels that
        # stay it is not the same number — as with LayerNormalization, what recovery trains for.
        return None
    if not axes or channel_axis in axes or (layout.kind == "map" and 0 in axes):
        return f"{node.op_type} across its channels"
    if attr(node, "keepdims", 1):
        return enter(node.output[0], layout)
    if layout.kind == "vec":
        return enter(node.output[0], replace(layout, rank=rank - len(axes)))
    if axes == list(range(2, rank)):
        return enter(node.output[0], replace(layout, kind="vec", rank=2))
    return f"{node.op_type} over part of the spatial axes"


def _through_layer_norm(node, layout: Layout, region: Region, g: Graph, enter) -> str | None:
    """LayerNorm over the channels: its scale and bias lose the pruned entries, and its statistics
    come from the channels that stay — not the same numbers, which is what recovery trains for."""
    if any(name in g.outputs or g.readers.get(name) for name in node.output[1:] if name):
        return "LayerNormalization statistics read elsewhere"
    if not all([region.cut(name, Param(0, layout.offsets, layout.block)) for name in node.input[1:] if name]):
        return "LayerNormalization parameters read again in other places"
    return enter(node.output[0], layout)


def _group_norm(node, layout: Layout, region: Region, g: Graph) -> str | None:
    """PyTorch's GroupNorm as it exports: x viewed as [n, G, -1], InstanceNormalization, and the result
    given x's shape again (its per-channel scale and bias follow as a Mul and an Add). Its statistics
    then come from the channels that stay, as a LayerNorm's do (what recovery trains for); with G > 1
    groups, each loses as many (``Region.segments``), so the view stays [n, G, -1]. The normalised
    tensor, which only the view back reads, is returned (it holds x's channels once viewed back);
    None when *node* does not start this pattern."""
    target = g.consts.get(node.input[1])
    if target is None or layout.block != 1 or layout.offsets != (0,) or layout.width not in (None, region.channels):
        return None
    entries = const_array(target).tolist()
    readers = g.readers.get(node.output[0], [])
    if len(entries) != 3 or entries[0] != 0 or entries[2] != -1 or len(readers) != 1 or \
            readers[0].op_type != "InstanceNormalization" or readers[0].input[0] != node.output[0]:
        return None
    groups, norm = entries[1], readers[0]
    if not all(name in g.consts and int(np.prod(g.consts[name].dims)) == groups for name in norm.input[1:3]):
        return None
    back = g.readers.get(norm.output[0], [])
    maker = g.made_by.get(back[0].input[1]) if len(back) == 1 and back[0].op_type == "Reshape" else None
    if maker is None or maker.op_type != "Shape" or maker.attribute or maker.input[0] != node.input[0] or \
            region.channels % groups or (groups > 1 and region.channels < 2 * groups) or \
            {node.output[0], norm.output[0]} & g.outputs:
        return None
    region.segments = math.lcm(region.segments, groups)
    return norm.output[0]


def _depthwise(node, layout: Layout, region: Region, g: Graph) -> bool:
    """A convolution of each channel on its own (MobileNet's 3x3s): it keeps channels apart."""
    weight = g.consts.get(node.input[1]) if len(node.input) > 1 else None
    width = layout.width or region.channels
    return weight is not None and attr(node, "group", 1) == width == weight.dims[0] and weight.dims[1] == 1


def _through_depthwise(node, region: Region, g: Graph, enter) -> str | None:
    layout = region.tensors.get(node.input[0])
    if layout is None or any(name in region.tensors for name in node.input[1:]) or layout.kind != "map":
        return "consumed by a depthwise Conv it cannot shrink"
    if not all([region.cut(name, Param(0, layout.offsets)) for name in node.input[1:] if name]):
        return "depthwise Conv weight read again in other places"
    region.depthwise.add(node.name)
    return enter(node.output[0], layout)


def _reader(node, region: Region, g: Graph) -> str | None:
    op, tensors = node.op_type, region.tensors
    axis = output_axis(node, g.consts)
    if axis is None or node.input[0] not in tensors or any(name in tensors for name in node.input[1:]):
        return f"consumed by a {op} it cannot shrink"
    layout = tensors[node.input[0]]
    if op == "Conv" and (layout.kind != "map" or layout.rank != len(g.consts[node.input[1]].dims)):
        return "a convolution after a fully connected layer or a flatten"
    if op != "Conv" and layout.kind == "map":
        return f"{op} applied to a feature map"
    if op == "Gemm" and layout.rank != 2:
        return "Gemm of a tensor that is not 2-D"
    if op == "Conv" and attr(node, "group", 1) > 1:
        why = _grouped_read(node, layout, region, g)
        if why:
            return why
    region.readers[node.name] = Reader(node.name, node.input[1], 1 if op == "Conv" else 1 - axis, layout.block,
                                       layout.offsets)
    return None


def _grouped_read(node, layout: Layout, region: Region, g: Graph) -> str | None:
    """A grouped Conv (ResNeXt's 3x3s, wav2vec2's positional convolution) reading the region's
    channels as they are: each of its groups reads its own equal run of them, so each run must
    lose as many channels (``Region.segments``) for every group to keep a block of one size."""
    groups, per_group = attr(node, "group", 1), int(g.consts[node.input[1]].dims[1])
    if layout.offsets != (0,) or layout.block != 1 or layout.width not in (None, region.channels) or \
            per_group * groups != region.channels:
        return "consumed by a grouped Conv that reads more than its channels"
    if per_group < 2:
        return "consumed by a grouped Conv with one channel per group"
    region.segments = math.lcm(region.segments, groups)
    return None


def _per_channel_const(name: str, layout: Layout, region: Region, g: Graph) -> bool:
    """A scalar, or one value per channel broadcast along the layout's channel axis; the latter is
    recorded for slicing (one shared with other nodes is cut for all: the plan checks that they are
    all in this region's group, cutting it the same way)."""
    init = g.consts[name]
    if is_scalar(init):
        return True
    dims = list(init.dims)
    if layout.block != 1:
        return False
    if layout.kind == "map":
        rank = layout.rank or 0
        axis = 1 - (rank - len(dims))  # the constant's own axis lined up with the map's axis 1
        if len(dims) > rank or axis < 0:
            return False
        if dims[axis] != (layout.width or region.channels) or any(d != 1 for i, d in enumerate(dims) if i != axis):
            return False
    else:
        # the channels last, other axes as they come (a transformer's position embedding, [1, tokens, C])
        axis = len(dims) - 1
        if dims[axis] != (layout.width or region.channels) or len(dims) > (layout.rank or len(dims)):
            return False
    return region.cut(name, Param(axis, layout.offsets))
