"""A Shape of a region tensor (see ``regions``): fine where nothing takes the channel count from it,
or where the count goes only to Reshapes of tensors that keep these channels, so that, read at run
time, it follows the pruning."""

from __future__ import annotations

from host_tools.compress.onnx import heads, repeat_kv
from host_tools.compress.onnx.layout import Graph, Layout, Region, attr, const_array
from host_tools.compress.onnx.static_shapes import slice_bounds


def step(node, layout: Layout, region: Region, g: Graph) -> str | None:
    """A Shape of a region tensor is fine when nothing takes the channel count from it (PyTorch reads
    a transformer's batch and token counts this way), or only to reshape a tensor that keeps the
    same channels."""
    axis = 1 if layout.kind == "map" else layout.at if layout.kind == "heads" else (layout.rank or 0) - 1
    if layout.rank is None or axis < 0:
        return "its shape is read (Shape) and its rank is unknown"
    start, end = (min(max(v + layout.rank if v < 0 else v, 0), layout.rank)
                  for v in (attr(node, "start", 0), attr(node, "end", layout.rank)))
    if not start <= axis < end:
        return None
    if layout.kind == "heads" and heads.shape_for_swap(node, layout, g):
        return None  # the sizes of a Kᵀ as torch.export writes it
    for reader in g.readers.get(node.output[0], []):
        if layout.kind == "heads" and reader.op_type == "Gather" and start == 0 and \
                repeat_kv.repeat_reads(reader, node.input[0], layout, g):
            continue  # the K/V head count for their repeat (grouped-query attention): it follows the pruning
        if reader.op_type == "Reshape" and reader.input[1] == node.output[0] and (start, end) == (0, layout.rank):
            # x.reshape(t.shape), as GroupNorm puts its output back: checked once the walk is done,
            # x must keep t's channels where t has them
            region.same_channels.append((reader.input[0], node.input[0]))
            continue
        if axis - start not in _read_entries(reader, end - start, g):
            continue
        reshaped = _count_for_a_reshape(reader, node.input[0], g)
        if reshaped is None:
            return "its channel count is read (Shape)"
        # checked once the walk is done: they must keep these channels
        region.same_channels += [(tensor, node.input[0]) for tensor in reshaped if tensor != node.input[0]]
    return None


def _count_for_a_reshape(reader, source: str, g: Graph) -> list[str] | None:
    """The tensors whose Reshapes the channel count that *reader* takes from *source*'s shape goes
    to, through Squeeze and Unsqueeze, and nowhere else: as the last entry, x.view(-1, x.size(-1)),
    as Hugging Face's Conv1D (GPT-2) flattens its input, GPT-2's last view of its hidden states to
    the shape its embeddings had, or Swin's views of its windows with the count it read once;
    anywhere for a Reshape of *source* itself, x.view(*x.shape[:2], -1) (SegFormer's image to
    tokens), where the Reshape's own rule checks where the channels land. Read at run time, it
    follows the pruning when those tensors keep the channels."""
    if reader.op_type not in ("Slice", "Gather"):
        return None
    reshaped, values = [], [reader.output[0]]
    while values:
        value = values.pop()
        users = g.readers.get(value, [])
        if not users or value in g.outputs:
            return None
        for user in users:
            if user.op_type in ("Squeeze", "Unsqueeze") and user.input[0] == value:
                values.append(user.output[0])
                continue
            if user.op_type != "Concat" or list(user.input).count(value) != 1:
                return None
            shaped = g.readers.get(user.output[0], [])
            if len(shaped) == 1 and shaped[0].op_type == "Resize" and shaped[0].input[0] == source and \
                    list(shaped[0].input).index(user.output[0]) == 3:
                continue  # the sizes of a Resize of source itself: its own batch and channels (resized_whole)
            if not shaped or any(n.op_type != "Reshape" or n.input[1] != user.output[0] for n in shaped):
                return None
            inputs = {n.input[0] for n in shaped}
            if len(inputs) != 1:
                return None
            tensor = inputs.pop()
            if tensor != source and user.input[-1] != value:
                return None
            reshaped.append(tensor)
    return reshaped


def _read_entries(node, length: int, g: Graph) -> range | list[int]:
    """Which entries of a shape vector *length* long a Gather or Slice takes (all: it cannot tell)."""
    every = range(length)
    if node.op_type == "Gather" and node.input[1] in g.consts:
        return list(const_array(g.consts[node.input[1]]).ravel() % length)
    consts = {name: const_array(g.consts[name]) for name in node.input[1:] if name in g.consts}
    bounds = slice_bounds(node, consts, {node.input[0]: [length]})
    return every[bounds[1]:bounds[2]] if bounds else every
