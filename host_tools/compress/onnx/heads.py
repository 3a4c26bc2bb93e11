"""Attention heads: a layer's outputs followed, as whole heads, past the Reshape that splits them.

Multi-head attention computes Q, K and V with one MatMul (or three), splits their last axis into
[heads, head size] (or [sections, heads, head size] for a fused QKV layer) with a Reshape, moves
the axes about with Transposes, takes softmax(Q·Kᵀ)·V head by head, and merges the heads back
with a Reshape before the output projection. Such a layer is pruned by heads: its unit becomes a
head — that head's block of outputs in every section — and the head axis is followed through
what keeps heads apart: Transpose; Split, Gather and Squeeze on other axes; Unsqueeze; MatMul
with the head axis among the batch axes; Softmax over a later axis; elementwise ops with scalars,
with masks that broadcast over the heads, or with another layer's heads (a relative-position bias
looked up per head, whose table is a layer of one channel per head: see ``regions``). The merging
Reshape turns heads back into channels of *head size* features each, for the output projection to
read; both Reshapes' shape constants are rewritten for the heads that stay. Anything else stops
the walk with the reason.

torch.export writes some of this its own way, and those forms are followed too: Kᵀ as a Reshape to
[-1, t, d], a Transpose and a Reshape back (``swapped_last_two``), the heads merged straight into rows
[-1, heads·size], head counts of repeat_kv as constants, a per-head bias added to a mask expanded to
the batch (``_per_head_sum``).

Grouped-query attention repeats each K/V head for m query heads (``repeat_kv``); after the repeat
a K/V layer's unit spans m heads, and the query layer is walked again with its heads taken m at a
time (``Region.coarse``, tried by ``channels``), so a K/V head is pruned with its query heads.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from host_tools.compress.onnx.layout import (BINARY_OPS, UNARY_OPS, Graph, Layout, Param, Region, attr, axes_of,
                                             ints, is_scalar)
from host_tools.compress.onnx.repeat_kv import repeat_of
from host_tools.compress.onnx.shape_targets import (concat_pieces, dims_out, shape_entry, size_read, target_entries,
                                                    with_names)


def split(node, region: Region, g: Graph, enter) -> str | None:
    """A Reshape of a layer's channels (the last axis): of the leading axes only (the channels stay
    last), or splitting the channels into [heads, size] or [sections, heads, size]."""
    layout = region.tensors[node.input[0]]
    features = (layout.width or region.channels) * layout.block
    if layout.rank is None:
        return "Reshape to a shape it cannot infer"
    out = dims_out(node, g, keep=layout.rank - 1)
    entries = target_entries(node, g)
    if out and entries and len(entries) == len(out) and out[-1] is None and entries[-1] == ("dim", layout.rank - 1):
        out = [*out[:-1], features]  # x.view(-1, x.size(-1)): the channels, whatever their count
    elif out and entries and len(entries) == len(out) and out[-1] is None and \
            (entries[-1] == -1 or entries[-1] is None and _reads_channels(node, region, g)) and \
            g.in_every_run(node.output[0], -1, features):
        # x.reshape(n, h, w, -1) (SegFormer's tokens to an image): the runtime works the channels out,
        # whatever their count, as it did in every made-up run; or the count read at run time from a
        # tensor of this region (Swin's windows, viewed with the count it read once), which the walk
        # checks at its end keeps these channels. (Were another entry this region's channel count,
        # read at run time, the walk would have stopped at that Shape.)
        out = [*out[:-1], features]
    if not out:
        return "Reshape to a shape it cannot infer"
    trailing: list[int] = []  # the fewest last axes of the new shape that hold the channels
    while len(trailing) < len(out) and np.prod(trailing, dtype=np.int64) < features:
        if out[-1 - len(trailing)] is None:
            break
        trailing.insert(0, out[-1 - len(trailing)])
    if np.prod(trailing, dtype=np.int64) != features:
        return "Reshape across its channels"
    if len(trailing) == 1:
        why = _channels_entry(node, entries, layout, len(out), features, region, g)
        return why or enter(node.output[0], replace(layout, rank=len(out)))
    if len(trailing) > 3 or layout.block != 1 or layout.width is not None or region.out_block != 1:
        return "Reshape of its channels that it cannot follow"
    sections, heads, size = ([1] + trailing)[-3:]
    m = region.coarse
    if m > 1 and (heads % m or heads == m):
        return f"{heads} heads cannot be taken {m} at a time"
    placed = [(v.kind, v.block, len(v.offsets)) for v in region.tensors.values()] + \
        [(None, p.block, len(p.offsets)) for p in region.params.values()] + \
        [(None, r.block, len(r.offsets)) for r in region.readers.values()]
    starts = [v.offsets[0] for v in region.tensors.values()] + [v.width or 0 for v in region.tensors.values()] + \
        [p.offsets[0] for p in region.params.values()] + [r.offsets[0] for r in region.readers.values()]
    if region.depthwise or any(kind not in (None, "vec") or block != 1 or n != 1 for kind, block, n in placed) or \
            any(start % (size * m) for start in starts):
        return "Reshape into heads of channels joined or flattened on the way"
    entry = shape_entry(node, len(out) - 2, heads, g)
    if isinstance(entry, str):
        return entry
    _in_heads(region, sections, heads // m, size * m)
    if entry:
        region.reshapes.append((*entry, m))
    return enter(node.output[0], Layout("heads", len(out), block=m, at=len(out) - 2))


def _reads_channels(node, region: Region, g: Graph) -> bool:
    """Whether a Reshape's target ends with the channel count of a tensor of *region*, read at run
    time: Unsqueeze(Gather(Shape(t), i)), i its channel axis, as the target's last piece."""
    maker = g.made_by.get(node.input[1])
    read = size_read(maker.input[-1], g) if maker is not None and maker.op_type == "Concat" else None
    if read is None or read[2] is not None:  # (the count itself, not a multiple)
        return False
    layout = region.tensors.get(read[0])
    if layout is None or layout.kind not in ("vec", "map") or layout.rank is None:
        return False
    return [i % layout.rank for i in read[1]] == [layout.rank - 1 if layout.kind == "vec" else 1]


def _channels_entry(node, entries: list | None, layout: Layout, rank: int, features: int, region: Region,
                    g: Graph) -> str | None:
    """A Reshape of the leading axes only ([n, t, C] -> [n·t, C]): a target shape that gives the
    channel count as a constant (x.reshape(-1, 32)) has it rewritten with the channels; -1, 0 (the
    input's own) or a count read at run time follow by themselves. *entries*: target_entries."""
    last = entries[-1] if entries else None
    if last is None or isinstance(last, tuple) or last == -1 or last == 0 and rank == layout.rank:
        return None
    entry = shape_entry(node, rank - 1, features, g)
    if isinstance(entry, str):
        return entry
    if not entry:
        return "Reshape with a shape it cannot rewrite"
    # Of a window (one part of a layer that a Split divides later: GPT-2's QKV on flattened tokens,
    # reshaped to [n, t, 3C] before the split) the count is the whole layer's, to shrink once for
    # every window that loses channels: the window's start tells the entries apart.
    per_unit = layout.block * len(layout.offsets)  # a unit's entries in the tensor
    region.reshapes.append((*entry, per_unit) if layout.width is None else (*entry, per_unit, layout.offsets))
    return None


def _in_heads(region: Region, sections: int, heads: int, size: int) -> None:
    """Re-express what the region holds so far (the layer's outputs, its bias, any readers) in heads:
    channel start + (s·heads + h)·size + i is feature i of head h in section s, where start is where
    the layer's channels begin (0, or a window's start after a Split of a fused QKV layer)."""
    def offsets(start: int) -> tuple[int, ...]:
        return tuple(start // size + s * heads for s in range(sections))

    def placed(layout: Layout) -> Layout:
        return replace(layout, block=size, offsets=offsets(layout.offsets[0]),
                       width=(layout.width // size) if layout.width else sections * heads)

    region.channels, region.out_offsets, region.out_block = heads, offsets(region.out_offsets[0]), size
    region.tensors = {name: placed(layout) for name, layout in region.tensors.items()}
    region.params = {name: replace(p, offsets=offsets(p.offsets[0]), block=size) for name, p in region.params.items()}
    region.readers = {name: replace(r, offsets=offsets(r.offsets[0]), block=size) for name, r in region.readers.items()}
    region.meets = [(name, placed(layout), op) for name, layout, op in region.meets]
    region.reshapes = [(name, entry, per_unit * size, *rest) for name, entry, per_unit, *rest in region.reshapes]


def step(node, region: Region, g: Graph, enter) -> str | None:
    """Take *node*, which reads a tensor holding heads, into the region; or say why it cannot be."""
    op, tensors = node.op_type, region.tensors
    layout = next(tensors[name] for name in node.input if name in tensors and tensors[name].kind == "heads")
    if any(name in tensors and tensors[name] != layout for name in node.input) and op != "MatMul":
        return f"{op} of its heads in two layouts"
    if op in UNARY_OPS:
        if any(name and (name not in g.consts or not is_scalar(g.consts[name])) for name in node.input[1:]):
            return f"{op} with bounds that are not scalar constants"
        return enter(node.output[0], layout)
    if op in ("IsNaN", "IsInf"):  # Hugging Face's guard for rows the mask left empty: Where(IsNaN(w), 0, w)
        return enter(node.output[0], layout)
    if op in BINARY_OPS or op == "Where":
        return _others(node, layout, region, g) or enter(node.output[0], layout)
    if op == "MatMul":
        return _through_matmul(node, region, g, enter)
    if op in ("Softmax", "LogSoftmax"):
        axis = attr(node, "axis", None)
        if axis is None or axis % layout.rank <= layout.at:
            return f"{op} across its heads"
        return enter(node.output[0], layout)
    if op == "Concat" and all(name in tensors for name in node.input):
        # pieces of the same heads put back together along another axis: the rotary embedding's
        # rotate-half, cat(-x[..., d/2:], x[..., :d/2]), as Llama writes it
        if attr(node, "axis", 0) % layout.rank == layout.at:
            return "Concat of its heads"
        return enter(node.output[0], layout)
    if node.input[0] not in tensors or any(name in tensors for name in node.input[1:]):
        return f"its heads are an extra input of {op}"
    if op == "Transpose":
        perm = ints(node, "perm") or list(reversed(range(layout.rank)))
        return enter(node.output[0], replace(layout, at=perm.index(layout.at)))
    if op == "Split":
        if attr(node, "axis", 0) % layout.rank == layout.at:
            return "Split of its heads"
        why = None
        for name in node.output:
            why = why or enter(name, layout)
        return why
    if op in ("Squeeze", "Gather"):
        return _through_fewer_axes(node, layout, g, enter)
    if op == "Unsqueeze":
        repeat = repeat_of(node.input[0], layout, g)
        if repeat is not None and repeat.unsqueeze.output[0] == node.output[0]:
            # the heads repeated for grouped-query attention: m heads from each, taken as one unit
            for target, count, m in repeat.written:  # the head counts written as constants, rewritten
                entry = shape_entry(target, layout.at, count, g)
                if isinstance(entry, str):
                    return entry
                if entry:
                    region.reshapes.append((*entry, m * layout.block))
            return enter(repeat.reshape.output[0], replace(layout, block=layout.block * repeat.times))
        return _through_unsqueeze(node, layout, g, enter)
    if op == "Reshape":
        back = swapped_last_two(node, layout, g)
        if back is not None:  # Kᵀ as torch.export writes it: the heads stay where they were
            return enter(back.output[0], layout)
        return _merge(node, layout, region, g, enter)
    return f"its heads feed {op}"


def swapped_last_two(reshape, layout: Layout, g: Graph):
    """x.transpose(-2, -1) as torch.export writes it in scaled_dot_product_attention (Kᵀ): x, heads
    and all, reshaped to [-1, t, d] with t and d read from its shape, Transpose [0, 2, 1], and
    reshaped back to x's leading axes read from the same shape, then [d, t]. Each head is
    transposed on its own, and every size follows the pruning: the last Reshape (whose output then
    holds the heads where x did), or None where *reshape* does not begin this."""
    x, rank = reshape.input[0], layout.rank
    if rank is None or rank < 3 or layout.at >= rank - 2 or \
            concat_pieces(reshape.input[1], x, g) != [-1, ("dim", rank - 2), ("dim", rank - 1)]:
        return None
    transpose = g.only_reader(reshape.output[0], "Transpose")
    if transpose is None or ints(transpose, "perm") != [0, 2, 1]:
        return None
    back = g.only_reader(transpose.output[0], "Reshape")
    swapped = [*(("dim", i) for i in range(rank - 2)), ("dim", rank - 1), ("dim", rank - 2)]
    if back is None or back.input[0] != transpose.output[0] or concat_pieces(back.input[1], x, g) != swapped:
        return None
    return back


def shape_for_swap(shape, layout: Layout, g: Graph) -> bool:
    """Whether a Shape of a tensor holding heads is read only for the sizes of swapped_last_two's
    Reshapes of it (Slices or a Split of it in their targets): then it follows the pruning."""
    x = shape.input[0]
    targets = set()
    for reshape in g.readers.get(x, []):
        back = swapped_last_two(reshape, layout, g) if reshape.op_type == "Reshape" and reshape.input[0] == x else None
        if back is not None:
            targets |= {reshape.input[1], back.input[1]}
    pieces = [name for s in g.readers.get(shape.output[0], []) for name in s.output]
    return bool(targets) and shape.output[0] not in g.outputs and \
        all(s.op_type in ("Slice", "Split") and s.input[0] == shape.output[0] for s in g.readers[shape.output[0]]) and \
        all(name not in g.outputs and all(u.op_type == "Concat" and u.output[0] in targets
                                          for u in g.readers.get(name, [])) for name in pieces)


def _others(node, layout: Layout, region: Region, g: Graph) -> str | None:
    """The other operands of an op on heads: scalars, or tensors that broadcast over the heads
    (a mask); constants with an entry per head (Swin's relative-position bias, [1, heads, N, N]
    once the exporter has folded its lookup), cut with the heads; another layer's heads must be
    tied to the rest (at MatMul: Q·Kᵀ, weights·V)."""
    for name in node.input:
        if not name or name in region.tensors:
            continue
        shape = list(g.consts[name].dims) if name in g.consts else g.shapes.get(name)
        if shape is None:
            return f"{node.op_type} with an operand of unknown shape"
        position = layout.at - (layout.rank - len(shape))
        if len(shape) > layout.rank:
            return f"{node.op_type} that broadcasts its heads to more axes"
        if position < 0 or shape[position] == 1:
            continue  # the same for every head
        if name in g.consts:
            if shape[position] != region.channels * layout.block or \
                    not region.cut(name, Param(position, block=layout.block)):
                return f"{node.op_type} with a constant that is not per head"
            continue
        if shape[position] is None and _one_when_run(name, layout, g):
            continue  # a mask built at run time, 1 along the heads in every run
        if _per_head_sum(name, len(shape), position, layout, region, g):
            continue
        region.meets.append((name, Layout("heads", len(shape), block=layout.block, at=position), node.op_type))
    return None


def _per_head_sum(name: str, rank: int, position: int, layout: Layout, region: Region, g: Graph) -> bool:
    """Whether *name* (rank *rank*, the heads on *position*), read only here, is a constant with an
    entry per head plus a tensor the same for every head: BEiT's relative-position bias added to a
    mask expanded to the batch at run time, as torch.export writes it. The constant then loses the
    pruned heads' entries (``region.cut``)."""
    maker = g.made_by.get(name)
    if maker is None or maker.op_type != "Add" or len(g.readers.get(name, [])) != 1 or name in g.outputs:
        return False
    consts = [i for i in maker.input if i in g.consts]
    others = [i for i in maker.input if i not in g.consts]
    if len(consts) != 1 or len(others) != 1:
        return False
    dims, other = list(g.consts[consts[0]].dims), g.shapes.get(others[0])
    if len(dims) != rank or dims[position] != region.channels * layout.block or other is None or len(other) > rank:
        return False
    at = position - (rank - len(other))  # the heads axis in the other operand (< 0: it broadcasts there)
    if at >= 0 and other[at] != 1:
        return False
    return region.cut(consts[0], Param(position, block=layout.block))


def _one_when_run(name: str, layout: Layout, g: Graph) -> bool:
    """Whether *name*, whose size along the heads inference cannot tell, was 1 there in every made-up
    run of the model (Hugging Face builds BERT's and GPT-2's masks [batch, 1, tokens, tokens] with
    sizes worked out at run time)."""
    runs = g.run_sizes(name)
    return bool(runs) and all(len(shape) <= layout.rank and layout.at - (layout.rank - len(shape)) >= 0 and
                              shape[layout.at - (layout.rank - len(shape))] == 1 for shape in runs)


def _through_matmul(node, region: Region, g: Graph, enter) -> str | None:
    """A batched MatMul whose batch axes include the heads (Q·Kᵀ, weights·V)."""
    rank = len(g.shapes.get(node.output[0]) or []) or None
    inside = [region.tensors[name] for name in node.input if name in region.tensors]
    ranks = [len(g.consts[name].dims) if name in g.consts else len(g.shapes.get(name) or []) for name in node.input]
    if rank is None or min(ranks) < 2 or any(v.kind != "heads" for v in inside):  # (a vector operand drops an axis)
        return "MatMul of heads it cannot follow"
    at = {v.at + rank - v.rank for v in inside}
    if len(at) > 1 or next(iter(at)) >= rank - 2:
        return "MatMul across its heads"
    if len({v.block for v in inside}) > 1:
        return "MatMul of its heads grouped two ways"
    out = Layout("heads", rank, block=inside[0].block, at=at.pop())
    return _others(node, out, region, g) or enter(node.output[0], out)


def _through_fewer_axes(node, layout: Layout, g: Graph, enter) -> str | None:
    """Squeeze of other axes; Gather on another axis (a fused QKV's sections taken one by one)."""
    if node.op_type == "Squeeze":
        axes = [a % layout.rank for a in axes_of(node, g.consts)]
        if not axes or layout.at in axes:
            return "Squeeze it cannot follow" if not axes else "Squeeze of its heads"
        return enter(node.output[0], replace(layout, rank=layout.rank - len(axes),
                                             at=layout.at - sum(a < layout.at for a in axes)))
    axis = attr(node, "axis", 0) % layout.rank
    indices = list(g.consts[node.input[1]].dims) if node.input[1] in g.consts else g.shapes.get(node.input[1])
    if axis == layout.at or indices is None:
        return "Gather of its heads" if axis == layout.at else "Gather with indices of unknown shape"
    shift = len(indices) - 1 if axis < layout.at else 0
    return enter(node.output[0], replace(layout, rank=layout.rank + len(indices) - 1, at=layout.at + shift))


def _through_unsqueeze(node, layout: Layout, g: Graph, enter) -> str | None:
    """New axes of size 1, before or after the heads (T5's position bias made [1, heads, q, k])."""
    axes = axes_of(node, g.consts)
    if not axes:
        return "Unsqueeze it cannot follow"
    rank = layout.rank + len(axes)
    at = layout.at
    for axis in sorted(a % rank for a in axes):  # axes count in the output: each one at or before shifts it
        at += axis <= at
    return enter(node.output[0], replace(layout, rank=rank, at=at))


def _merge(node, layout: Layout, region: Region, g: Graph, enter) -> str | None:
    """The Reshape that merges [heads, size] back into channels for the output projection; or one
    that leaves the shape as it was (Hugging Face's attention reshapes its result to [batch, -1,
    tokens, size] on the way)."""
    shape = list(g.shapes.get(node.input[0]) or [])
    count = region.channels * layout.block  # the heads (units of block heads)
    if len(shape) == layout.rank:
        shape[layout.at] = count  # what inference may not know: the heads axis holds the heads
    if shape and _keeps_shape(node, layout, shape, g):
        entry = shape_entry(node, layout.at, count, g)
        if isinstance(entry, str):
            return entry
        if entry:
            region.reshapes.append((*entry, layout.block))
        return enter(node.output[0], layout)
    flat = _flattened_tokens(node, layout, shape, count, g)
    if isinstance(flat, str):
        return flat
    if flat is not None:
        entry, rows = flat
        if entry:
            region.reshapes.append(entry)
        return enter(node.output[0], rows)
    out = dims_out(node, g, keep=layout.rank - 2, dims=shape)
    if layout.at != layout.rank - 2 or not shape or not out or None in shape[-2:] or len(out) != layout.rank - 1:
        return "Reshape of its heads it cannot follow"
    heads, size = shape[-2:]
    if heads != count or out[-1] != heads * size:
        return "Reshape of its heads it cannot follow"
    entry = shape_entry(node, len(out) - 1, heads * size, g)
    if isinstance(entry, str):
        return entry
    if entry:
        region.reshapes.append((*entry, size * layout.block))
    return enter(node.output[0], Layout("vec", len(out), block=size * layout.block))


def _flattened_tokens(node, layout: Layout, shape: list, count: int, g: Graph):
    """The heads merged into channels and every token made a row: [n, t, heads, size] to [-1, heads·size],
    as torch.export writes GPT-2's Conv1D on the attention's result. (the shape entry to rewrite or
    None, the layout of the rows) when *node* is that Reshape; why not when its count cannot be
    rewritten; None when it is another Reshape."""
    entries = target_entries(node, g)
    if layout.at != layout.rank - 2 or len(shape) != layout.rank or None in shape[-2:] or shape[-2] != count or \
            not entries or len(entries) != 2 or entries[0] != -1 or entries[1] != count * shape[-1]:
        return None
    entry = shape_entry(node, 1, count * shape[-1], g)
    if isinstance(entry, str):
        return entry
    return ((*entry, shape[-1] * layout.block) if entry else None), Layout("vec", 2, block=shape[-1] * layout.block)


def _keeps_shape(node, layout: Layout, shape: list, g: Graph) -> bool:
    """Whether a Reshape of heads gives back the shape it was given: its output, the -1 worked out,
    has the input's sizes — numbers, or the same names — from the heads axis on; or, where inference
    lost track of the sizes, it did in every made-up run of the model, with the heads count given as
    -1 or as the count itself."""
    same = dims_out(node, g, keep=layout.at, dims=shape)
    named = with_names(shape, g.names.get(node.input[0]))
    if same and with_names(same, g.names.get(node.output[0])) == named and None not in named[layout.at:]:
        return True
    entries = target_entries(node, g)
    runs = g.run_sizes(node.input[0])
    return bool(entries) and len(entries) == layout.rank and entries[layout.at] in (-1, shape[layout.at]) and \
        bool(runs) and runs == g.run_sizes(node.output[0]) and all(run[layout.at] == shape[layout.at] for run in runs)


