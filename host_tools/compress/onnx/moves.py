"""Where a region's channels move rather than change: a Transpose between NCHW and NHWC, a Slice or
Pad of other axes, a Reshape that flattens a feature map, a Concat with other channels (or along
another axis), a Split of them. Each takes the node the walk in ``regions`` reached, follows the
channels into its output(s) with *enter*, or says why it cannot."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from host_tools.compress.onnx import shape_targets
from host_tools.compress.onnx.layout import Graph, Layout, Param, Region, attr, const_array, ints


def transpose(node, layout: Layout, enter) -> str | None:
    """A permutation that moves the channels between axis 1 (NCHW) and the last axis (NHWC), as
    ConvNeXt's blocks do around their LayerNorm and linear layers; or that leaves them where they are.
    Channels moved from the last axis to another are followed as heads, one channel each (see
    ``heads``): T5 looks up its relative-position bias in a table of [buckets, heads], as [q, k,
    heads], and moves the heads in front to add the bias to each head's scores."""
    rank = layout.rank
    if rank is None or layout.block != 1 or layout.width is not None:
        return "its output feeds Transpose"
    perm = ints(node, "perm") or list(reversed(range(rank)))
    moved = perm.index(1 if layout.kind == "map" else rank - 1)
    if moved == rank - 1:
        return enter(node.output[0], replace(layout, kind="vec"))
    if moved == 1 and rank > 2:
        return enter(node.output[0], replace(layout, kind="map"))
    if layout.kind == "vec":
        return enter(node.output[0], Layout("heads", rank, at=moved))
    return "its output feeds Transpose"


def other_axes(node, layout: Layout, g: Graph, enter) -> str | None:
    """A Slice or Pad of other axes than the channels (Swin's patch merging takes every second row
    and column; its windows are padded to whole ones and cropped back): the channels stay where
    they were. Its axes must be known; a Pad's pads on the channel axis must be zero."""
    rank, channel_axis = layout.rank, 1 if layout.kind == "map" else (layout.rank or 0) - 1
    if rank is None or layout.block != 1 or layout.width is not None:
        return f"its output feeds {node.op_type}"
    if len(node.input) > 3 and node.input[3]:  # Slice(data, starts, ends, axes, …), Pad(data, pads, value, axes)
        if node.input[3] not in g.consts:
            return f"{node.op_type} of axes it cannot tell"
        axes = [int(a) % rank for a in const_array(g.consts[node.input[3]]).ravel()]
    elif node.op_type == "Slice":
        starts = node.input[1]
        count = len(const_array(g.consts[starts]).ravel()) if starts in g.consts else \
            (g.shapes.get(starts) or [None])[0]
        if count is None:
            return "Slice of axes it cannot tell"
        axes = list(range(count))
    else:
        axes = list(range(rank))
    if node.op_type == "Slice":
        return "Slice of its channels" if channel_axis in axes else enter(node.output[0], layout)
    if channel_axis not in axes:
        return enter(node.output[0], layout)
    pads = g.run_values(node.input[1]) if node.input[1] not in g.consts else [const_array(g.consts[node.input[1]])]
    where = axes.index(channel_axis)
    if not pads or any(len(np.ravel(p)) != 2 * len(axes) or np.ravel(p)[where] or np.ravel(p)[len(axes) + where]
                       for p in pads):
        return "Pad of its channels"
    return enter(node.output[0], layout)


def flattens(node, layout: Layout, g: Graph) -> bool:
    """Whether a Reshape of a feature map makes one vector of each sample ([n, C, h, w] -> [n, C·h·w]),
    as Flatten does: nn.Flatten as torch.export writes it, the target [-1, C·h·w] (or [1, C·h·w], the
    batch of the example it was exported with), or x.view(x.size(0), -1)."""
    shape, entries = g.shapes.get(node.input[0]), shape_targets.target_entries(node, g)
    if layout.block != 1 or not shape or len(shape) < 3 or None in shape[1:] or not entries or len(entries) != 2:
        return False
    batch, count = entries
    features = int(np.prod(shape[1:], dtype=np.int64))
    if count == -1:
        return batch in (0, ("dim", 0)) or isinstance(batch, int) and batch == shape[0]
    return count == features and (batch in (-1, 0, ("dim", 0)) or isinstance(batch, int) and batch == shape[0])


def flatten(node, layout: Layout, region: Region, g: Graph, enter) -> str | None:
    """A Reshape that _flattens: followed as a Flatten; a feature count written as a constant loses
    each pruned channel's h·w features."""
    shape = g.shapes[node.input[0]]
    block = int(np.prod(shape[2:], dtype=np.int64))
    entry = shape_targets.shape_entry(node, 1, int(shape[1]) * block, g)
    if isinstance(entry, str):
        return entry
    if entry:
        region.reshapes.append((*entry, block))
    return enter(node.output[0], replace(layout, kind="vec", rank=2, block=block))


def concat(node, region: Region, g: Graph, enter) -> str | None:
    """Channels joined with others (a U-Net's skip connection, Inception's branches): the region
    goes on at its offsets in the wider tensor; the other inputs' channels are not this layer's."""
    tensors = region.tensors
    layout = next(tensors[name] for name in node.input if name in tensors)
    rank = layout.rank
    axis = attr(node, "axis", 1) % rank if rank else None
    if axis is not None and axis != (1 if layout.kind == "map" else rank - 1) and layout.kind in ("map", "vec"):
        return _along_another_axis(node, layout, region, g, enter)
    if axis is None or axis != (1 if layout.kind == "map" else rank - 1) or layout.block != 1:
        return "Concat along another axis"
    offsets, width = [], 0
    for name in node.input:
        if name in tensors:
            if replace(tensors[name], offsets=(0,), width=None) != replace(layout, offsets=(0,), width=None):
                return "Concat of its output in two layouts"
            offsets += [width + o for o in tensors[name].offsets]
            width += tensors[name].width or region.channels
        else:
            shape = g.shapes.get(name)
            if shape and len(shape) == rank and not shape[axis]:  # inference lost it: made-up runs may tell
                seen = {run[axis] for run in g.run_sizes(name) if len(run) == rank}
                shape = [*shape[:axis], seen.pop(), *shape[axis + 1:]] if len(seen) == 1 else None
            if not shape or len(shape) != rank or not shape[axis]:
                return "Concat with an input of unknown width"
            width += shape[axis]
    return enter(node.output[0], replace(layout, offsets=tuple(offsets), width=width))


def _along_another_axis(node, layout: Layout, region: Region, g: Graph, enter) -> str | None:
    """A Concat along an axis other than the channels (more tokens): every input must hold the
    channels where the region's tensor does: another of its tensors, or a constant with an entry
    per channel — as it is, or expanded to the batch (ViT's class token, [1, 1, C] expanded to
    [n, 1, C] and put before the patches), which loses the pruned channels' entries."""
    channel_axis = 1 if layout.kind == "map" else layout.rank - 1
    if layout.block != 1 or layout.width is not None:
        return "Concat along another axis"
    for name in node.input:
        if name in region.tensors:
            if region.tensors[name] != layout:
                return "Concat of its output in two layouts"
            continue
        maker = g.made_by.get(name)
        if maker is not None and maker.op_type == "Expand" and maker.input[0] in g.consts and \
                _keeps_size(maker.input[1], channel_axis, g):
            name = maker.input[0]
        dims = list(g.consts[name].dims) if name in g.consts else []
        if len(dims) != layout.rank or dims[channel_axis] != region.channels or \
                not region.cut(name, Param(channel_axis)):
            return "Concat along another axis with an input not of these channels"
    return enter(node.output[0], layout)


def _keeps_size(target: str, axis: int, g: Graph) -> bool:
    """Whether an Expand to *target* leaves its input's size on *axis* as it is (the entry 1, or -1
    as PyTorch's expand writes "keep")."""
    if target in g.consts:
        entries = const_array(g.consts[target]).ravel()
        return axis < len(entries) and int(entries[axis]) in (1, -1)
    concat = shape_targets.built_from(target, g)
    if concat is None or axis >= len(concat.input) or concat.input[axis] not in g.consts:
        return False
    piece = const_array(g.consts[concat.input[axis]]).ravel()
    return len(piece) == 1 and int(piece[0]) in (1, -1)


def split(node, region: Region, g: Graph, enter) -> str | None:
    """A Split along another axis keeps the channels in every part. Along the channels (YOLO's C2f
    and CSP blocks take their convolution's output apart this way), the region goes on in the part
    that holds its channels, whose size in the Split's sizes is rewritten; a Split that divides all
    of the layer's channels is noted (``Region.windows``), so that each part is pruned as a window
    of the layer of its own."""
    layout = region.tensors[node.input[0]]
    rank = layout.rank
    axis = attr(node, "axis", 0) % rank if rank else None
    if axis is None:
        return "Split it cannot follow"
    if axis != (1 if layout.kind == "map" else rank - 1):
        why = None
        for name in node.output:
            why = why or enter(name, layout)
        return why
    sizes_input = node.input[1] if len(node.input) > 1 else ""
    if sizes_input not in g.consts or g.uses[sizes_input] > 1 or layout.block != 1 or len(layout.offsets) > 1:
        return "Split of its channels into parts it cannot resize"
    sizes = [int(v) for v in const_array(g.consts[sizes_input]).ravel()]
    starts = [sum(sizes[:j]) for j in range(len(sizes))]
    offset, channels = layout.offsets[0], region.channels
    for j, (start, size) in enumerate(zip(starts, sizes)):
        if start <= offset and offset + channels <= start + size:
            region.reshapes.append((sizes_input, j, 1))
            inside = replace(layout, offsets=(offset - start,), width=size if size != channels else None)
            return enter(node.output[j], inside)
    if layout.width is None and offset == 0 and region.out_offsets == (0,):  # all of the layer's channels
        region.windows = list(zip(starts, sizes))
    return "Split across its channels"
