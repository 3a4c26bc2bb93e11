"""Where a region's channels move rather than change (see ``regions``): padding, transposes, slices
and strided slices of other axes, a broadcast along other axes, a CONCATENATION (a join along the
channels, or a part among others along another axis) and reshapes that keep each channel's values
on one axis. Each takes the op the walk reached and returns the tensors to follow on (tensor,
channel axis, positions), or why it cannot."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from host_tools.compress.tflite.graph import Graph

if TYPE_CHECKING:
    from host_tools.compress.tflite.regions import Region


def padded(g: Graph, region: Region, k: int, t: int, axis: int, positions: np.ndarray):
    pads = g.const(g.input(k, 1))
    if pads is None or np.any(pads[axis] != 0):
        return f"padded along its channels ({g.label(k)})"
    return [(int(g.ops[k].outputs[0]), axis, positions)]


def transposed(g: Graph, region: Region, k: int, t: int, axis: int, positions: np.ndarray):
    perm = g.const(g.input(k, 1))
    if perm is None:
        return f"feeds {g.label(k)} with a permutation it computes"
    rank = len(g.shape(t))
    return [(int(g.ops[k].outputs[0]), [int(p) % rank for p in np.ravel(perm)].index(axis), positions)]


def sliced(g: Graph, region: Region, k: int, t: int, axis: int, positions: np.ndarray):
    """A SLICE of other axes keeps the channels (its size follows them); one that takes a window of a
    layer's own channels as they are is noted (``Region.windows``, see ``tiling``)."""
    begin, size = g.const(g.input(k, 1)), g.const(g.input(k, 2))
    if begin is None or size is None:
        return f"feeds {g.label(k)} with bounds it computes"
    if begin[axis] != 0 or size[axis] not in (-1, g.shape(t)[axis]):
        plain = np.arange(region.channels)[:, None]
        if axis == len(g.shape(t)) - 1 and size[axis] > 0 and not region.begins and \
                np.array_equal(region.edits[0][3], plain) and np.array_equal(positions, plain):
            region.windows.append((k, int(begin[axis]), int(size[axis]), t))  # a window of the layer's channels
            return []
        return f"sliced across its channels ({g.label(k)})"
    region.targets.add((k, 2))
    return [(int(g.ops[k].outputs[0]), axis, positions)]


def broadcast(g: Graph, region: Region, k: int, t: int, axis: int, positions: np.ndarray):
    """Repeated along other axes (Llama's repeat_kv, each K/V head for its group of query heads)."""
    out = int(g.ops[k].outputs[0])
    out_shape = g.shape(out)
    out_axis = len(out_shape) - (len(g.shape(t)) - axis)
    if out_shape[out_axis] != g.shape(t)[axis] or g.const(g.input(k, 1)) is None:
        return f"broadcast across its channels ({g.label(k)})"
    region.targets.add((k, 1))
    return [(out, out_axis, positions)]


def concatenated(g: Graph, region: Region, k: int, position: int, t: int, axis: int, positions: np.ndarray):
    """Joined along the channels: a join (``Region.joins``, ``join``). Joined along another axis
    (rotary embedding's halves): every part must carry the same channels; a constant part (ViT's
    class token before the patches) loses them with the layer."""
    op, rank = g.ops[k], len(g.shape(t))
    if op.builtinOptions.axis % rank == axis:
        region.joins.setdefault(k, {})[position] = (t, axis, positions)
        return []
    for j, i in enumerate(int(i) for i in op.inputs):
        if i == t:
            continue
        value = g.const(i)
        if value is None:
            region.meets.append((i, axis, positions, g.label(k)))
        elif value.ndim != rank or value.shape[axis] != g.shape(t)[axis]:
            return f"{g.label(k)} joins a constant of other channels"
        else:
            region.edits.append((k, j, axis, positions))
    return [(int(op.outputs[0]), axis, positions)]


def reshaped(g: Graph, region: Region, k: int, t: int, axis: int, positions: np.ndarray):
    """Follow the channels through a change of shape: each channel's values must land on one axis of
    the output, spread evenly along it (a flatten). A reshape that spreads them over several axes
    stops the walk, and notes how the channels could be grouped instead (attention heads)."""
    shape, out = g.shape(t), int(g.ops[k].outputs[0])
    out_shape = g.shape(out)
    if int(np.prod(shape)) != int(np.prod(out_shape)) or np.prod(shape) > 1 << 24:
        return f"feeds {g.label(k)} of a shape it cannot follow"
    labels = np.full(shape, -1, np.int32)
    index = [slice(None)] * len(shape)
    for c, where in enumerate(positions):
        index[axis] = where
        labels[tuple(index)] = c
    labels = labels.reshape(out_shape)
    for new_axis in range(len(out_shape)):
        moved = np.moveaxis(labels, new_axis, 0).reshape(out_shape[new_axis], -1)
        if (moved == moved[:, :1]).all():
            column = moved[:, 0]
            where = [np.flatnonzero(column == c) for c in range(len(positions))]
            if len({len(w) for w in where}) != 1:
                break
            if g.kinds[k] == "RESHAPE":
                region.targets.add((k, 1))
            return [(out, new_axis, np.array(where))]
    if positions.shape[1] == 1 and len(positions) == region.channels and not region.splits:
        region.splits = _splits(labels, len(positions))
    return f"reshaped across its channels ({g.label(k)})"


def _splits(labels: np.ndarray, channels: int) -> list[np.ndarray]:
    """Where a reshape spreads each channel over several axes (192 -> 3 x 4 x 16: Q/K/V, head, head
    dim), the channels grouped by their index along each such axis, fewest groups first."""
    found = []
    for axis in range(labels.ndim):
        size = labels.shape[axis]
        if not 1 < size < channels:
            continue
        moved = np.moveaxis(labels, axis, 0).reshape(size, -1)
        groups = [np.unique(row[row >= 0]) for row in moved]
        if sum(len(g) for g in groups) == channels and len({len(g) for g in groups}) == 1:
            found.append(np.array(groups))
    return sorted(found, key=len)


def strided(g: Graph, region: Region, k: int, t: int, axis: int, positions: np.ndarray):
    """A STRIDED_SLICE of other axes (Swin's patch merging takes every second row and column) keeps
    every channel where it was; its end names the channel count, and follows it."""
    begin, end, strides = (g.const(g.input(k, i)) for i in (1, 2, 3))
    options = g.ops[k].builtinOptions
    if begin is None or end is None or strides is None or options is None or \
            options.ellipsisMask or options.newAxisMask or options.shrinkAxisMask or getattr(options, "offset", False):
        return f"feeds {g.label(k)} with bounds it computes or masks it cannot follow"
    whole_begin = begin[axis] == 0 or options.beginMask >> axis & 1
    whole_end = end[axis] >= g.shape(t)[axis] or options.endMask >> axis & 1
    if not (whole_begin and whole_end and strides[axis] == 1):
        return f"sliced across its channels ({g.label(k)})"
    if not options.endMask >> axis & 1:
        region.targets.add((k, 2))
    return [(int(g.ops[k].outputs[0]), axis, positions)]


def join(g: Graph, k: int, parts: dict[int, tuple[int, int, np.ndarray]]):
    """A CONCATENATION along the channels: each input that carries them puts them at its offset. Several
    inputs carrying the same channels (Swin's patch merging joins four strided views of one map)
    give each channel a place in each: unit u's positions are its positions in every such part."""
    inputs = [int(i) for i in g.ops[k].inputs]
    (t, axis, positions), *others = parts.values()
    if any(other_axis != axis or not np.array_equal(other, positions) for _, other_axis, other in others):
        return f"{g.label(k)} joins its channels in two layouts"
    places = [positions + sum(g.shape(i)[axis] for i in inputs[:position]) for position in sorted(parts)]
    return [(int(g.ops[k].outputs[0]), axis, np.concatenate(places, axis=1))]
