"""Reshapes and Resizes of a feature map that keep its batch and its channels, so that a pruned
layer's channels pass through them: [n, C, h·w] <-> [n, C, h, w] (``spatial``), and a Resize that
takes its batch and channel sizes from its own input at run time (``resized_whole``).
``regions`` walks a layer's channels through them; ``heads`` follows the Reshapes that split
channels into attention heads."""

from __future__ import annotations

import numpy as np

from host_tools.compress.onnx.layout import Graph, Layout, Region
from host_tools.compress.onnx.shape_targets import shape_entry, target_entries, with_names


def spatial(node, layout: Layout, region: Region, g: Graph, enter) -> str | None:
    """A Reshape of a feature map's spatial axes that keeps its batch and channels ([n, C, h·w] <->
    [n, C, h, w]), as SegFormer's Mix-FFN folds its tokens into an image for a depthwise convolution
    and back. The channel entry is the input's own (0, or read at run time), -1, or the count as a
    constant, rewritten."""
    out, shape = g.shapes.get(node.output[0]), g.shapes.get(node.input[0])
    maker = g.made_by.get(node.input[1])
    if maker is not None and maker.op_type == "Shape" and not maker.attribute and \
            region.tensors.get(maker.input[0]) == layout:
        return enter(node.output[0], layout)  # x.reshape(t.shape), t holding the channels as x does
    entries = target_entries(node, g)
    if layout.block != 1 or layout.width is not None or region.out_block != 1 or not out or not shape or \
            len(out) < 3 or not entries or len(entries) != len(out):
        return "its output feeds Reshape"
    batch, count = entries[:2]
    named = with_names(out, g.names.get(node.output[0]))[0]
    same_batch = isinstance(named, str) and named == with_names(shape, g.names.get(node.input[0]))[0]
    # -1 beside constants that are the rest of the input's shape is its batch (torch.export writes
    # ViT's x.flatten(2) as a Reshape to [-1, C, h·w]); it still is once the channel entry is rewritten
    rest = entries[1:]
    batch_left = batch == -1 and None not in shape[1:] and all(isinstance(e, int) and e > 0 for e in rest) and \
        np.prod(rest, dtype=np.int64) == np.prod(shape[1:], dtype=np.int64)
    if not (batch in (0, ("dim", 0)) or batch is None and same_batch and out[0] is None or
            isinstance(batch, int) and batch == shape[0] or batch_left):
        return "Reshape of a feature map's batch"
    # (a -1 beside sizes read at run time, x.reshape(n, -1, h, w) as SegFormer's decoder writes it, is
    # the channels if it was in every made-up run)
    unsure = count == -1 and any(e is None for e in entries) and \
        not g.in_every_run(node.output[0], 1, region.channels)
    if ("dim", 1) in entries[2:] or count not in (0, ("dim", 1), -1, region.channels) or unsure:
        return "Reshape of a feature map across its channels"
    if isinstance(count, int) and count == region.channels:
        entry = shape_entry(node, 1, region.channels, g)
        if isinstance(entry, str):
            return entry
        region.reshapes.append((*entry, 1))
    return enter(node.output[0], Layout("map", len(out)))


def resized_whole(node, layout: Layout, g: Graph) -> bool:
    """Whether a Resize of a feature map takes its batch and channel sizes from its own input's shape
    at run time (F.interpolate(x, size=(h, w)): sizes x.shape[:2] + (h, w)), so they follow the pruning."""
    if layout.kind != "map" or len(node.input) < 4 or not node.input[3]:
        return False
    entries = target_entries(node, g, 3)
    return bool(entries) and entries[:2] == [("dim", 0), ("dim", 1)] and ("dim", 1) not in entries[2:]
