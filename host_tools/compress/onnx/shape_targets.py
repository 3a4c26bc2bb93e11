"""How a Reshape's target shape (or a Resize's sizes, an Expand's shape) is built, read for the
pruning: its entries as constants, or sizes read from a tensor's shape at run time (x.shape[i],
x.size(-1), x.shape[:2]), possibly times a constant, pieced together by a Concat as PyTorch's
exporters write them; the output dimensions inference could not tell, worked out from the sizes
the exporter named; and which constant holds an entry, so that pruning can rewrite it."""

from __future__ import annotations

import numpy as np

from host_tools.compress.onnx.layout import Graph, attr, const_array, is_scalar
from host_tools.compress.onnx.static_shapes import slice_bounds


def _one_entry_each(concat, position: int, g: Graph) -> bool:
    """Whether every piece of a Concat building a shape is one entry long, and it has entry *position*."""
    return position < len(concat.input) and \
        all((list(g.consts[p].dims) if p in g.consts else g.shapes.get(p)) == [1] for p in concat.input)


def written_count(concat, position: int, g: Graph) -> int | None:
    """The Concat's entry *position* where it is a constant one entry long (each piece one entry)."""
    if not _one_entry_each(concat, position, g):
        return None
    piece = concat.input[position]
    return int(const_array(g.consts[piece]).ravel()[0]) if piece in g.consts else None


def built_from(target: str, g: Graph):
    """The Concat a shape target is built from, through PyTorch's handling of -1 in expand
    (Where(Equal(s, -1), 1, s)) and Reshapes of the shape vector itself."""
    node = g.made_by.get(target)
    for _ in range(8):
        if node is None or node.op_type == "Concat":
            return node
        node = g.made_by.get(node.input[2] if node.op_type == "Where" else node.input[0]) \
            if node.op_type in ("Where", "Reshape") else None
    return None


def count_read(concat, position: int, tensor: str, g: Graph) -> int | None:
    """m where the Concat's entry *position* (each piece one entry long) is *tensor*'s size on that
    axis read at run time, times a constant m; None if it is anything else."""
    if not _one_entry_each(concat, position, g):
        return None
    read = size_read(concat.input[position], g)
    if read is None or read[0] != tensor or read[1] != [position]:
        return None
    return 1 if read[2] is None else read[2]


def size_read(piece: str, g: Graph) -> tuple[str, list[int], int | None] | None:
    """(t, [i], m) where a shape target's *piece* is Unsqueeze(Gather(Shape(t), i)), the size t has on
    axis i read at run time (m None), or that times a scalar constant m (Unsqueeze(Mul(…, m))); else
    None."""
    node, times = g.made_by.get(piece), None
    if node is None or node.op_type != "Unsqueeze":
        return None
    node = g.made_by.get(node.input[0])
    if node is not None and node.op_type == "Mul":
        other = [name for name in node.input if name in g.consts]
        read = [name for name in node.input if name not in g.consts]
        if len(other) != 1 or len(read) != 1 or not is_scalar(g.consts[other[0]]):
            return None
        times, node = int(const_array(g.consts[other[0]]).ravel()[0]), g.made_by.get(read[0])
    if node is None or node.op_type != "Gather" or node.input[1] not in g.consts:
        return None
    shape = g.made_by.get(node.input[0])
    if shape is None or shape.op_type != "Shape" or shape.attribute:
        return None
    return shape.input[0], [int(i) for i in const_array(g.consts[node.input[1]]).ravel()], times


def dims_out(node, g: Graph, keep: int, dims: list | None = None) -> list | None:
    """A Reshape's output dimensions as inferred. Where inference could not tell the entry the target
    shape gives as -1 (Hugging Face writes heads as [batch, tokens, -1, size]), and the first *keep*
    axes stay as they were, the -1 is what is left of the input's other axes: sizes the exporter
    named (batch, tokens) cancel by name. *dims*: the input's, where the caller knows more."""
    out = g.shapes.get(node.output[0])
    dims = dims or g.shapes.get(node.input[0])
    if not out or None not in out or not dims or len(dims) < keep:
        return out
    sized_out = with_names(out, g.names.get(node.output[0]))
    sized_in = with_names(dims, g.names.get(node.input[0]))
    entries = target_entries(node, g)
    if entries is None or len(entries) != len(out) or entries.count(-1) != 1 or entries.index(-1) < keep:
        return out
    # Leading axes stay: equal sizes, or sizes inference lost track of on either side that the
    # target reads at run time (x.shape[i]: a Shape read, or 0, the input's own).
    def unnamed(size) -> bool:
        return size is None or isinstance(size, str) and size.startswith("unk__")

    def read(entry) -> bool:
        return entry is None or isinstance(entry, tuple) or entry == 0

    if not all(a == b and not unnamed(a) or (unnamed(a) or unnamed(b)) and read(entries[i])
               for i, (a, b) in enumerate(zip(sized_out[:keep], sized_in[:keep]))):
        return out
    at = entries.index(-1)
    left = list(sized_in[keep:])
    known = 1
    for i, size in enumerate(sized_out[keep:], keep):
        if i == at:
            continue
        if isinstance(size, int):
            known *= size
        elif size in left:
            left.remove(size)
        else:
            return out
    if not all(isinstance(size, int) for size in left) or known == 0 or int(np.prod(left, dtype=np.int64)) % known:
        return out
    return [*out[:at], int(np.prod(left, dtype=np.int64)) // known, *out[at + 1:]]


def with_names(dims: list, names: list | None) -> list:
    """Dimensions with the exporter's names for the sizes inference does not know as numbers."""
    names = names if names and len(names) == len(dims) else [None] * len(dims)
    return [d if d is not None else n for d, n in zip(dims, names)]


def target_entries(node, g: Graph, shape_input: int = 1) -> list | None:
    """A Reshape's target shape (or another op's, its input *shape_input*: Resize's sizes) where it is
    constant: ints; ("dim", i) for the input's own dimension i read at run time (o.reshape(o.shape[0],
    -1, o.shape[2], 16)); None for other pieces computed at run time (PyTorch's Concat of the batch
    size read with Shape and constants)."""
    source = node.input[shape_input]
    if source in g.consts:
        return [int(v) for v in const_array(g.consts[source]).ravel()]
    return concat_entries(source, node.input[0], g)


def concat_entries(source: str, tensor: str, g: Graph) -> list | None:
    """The entries of a shape a Concat builds: ints for constants, ("dim", i) for *tensor*'s dimension
    i read at run time, None for other pieces; None when it is not a Concat or a piece's length is
    unknown."""
    maker = g.made_by.get(source)
    if maker is None or maker.op_type != "Concat":
        return None
    entries: list = []
    for piece in maker.input:
        if piece in g.consts:
            entries += [int(v) for v in const_array(g.consts[piece]).ravel()]
        elif (g.shapes.get(piece) or [None])[0] is None:
            return None
        else:
            own = own_dims(piece, tensor, g)
            entries += [("dim", i) for i in own] if own else [None] * g.shapes[piece][0]
    return entries


def own_dims(piece: str, tensor: str, g: Graph) -> list[int]:
    """[i, …] where *piece* is the tensor's dimensions i, … read at run time: Unsqueeze(Gather(Shape(
    tensor), i)), or a Slice of Shape(tensor), or one part of a Split of it, maybe squeezed and
    unsqueezed again (x.size(-1), x.shape[:2]); [] where it is something else."""
    node = g.made_by.get(piece)
    while node is not None and node.op_type in ("Unsqueeze", "Squeeze"):
        node = g.made_by.get(node.input[0])
    if node is None or node.op_type not in ("Gather", "Slice", "Split"):
        return []
    shape = g.made_by.get(node.input[0])
    rank = len(g.shapes.get(tensor) or [])
    if shape is None or shape.op_type != "Shape" or shape.input[0] != tensor or not rank:
        return []
    start, end = (min(max(v + rank if v < 0 else v, 0), rank)
                  for v in (attr(shape, "start", 0), attr(shape, "end", rank)))  # Shape(x, start=…, end=…)
    length = end - start
    if node.op_type == "Gather":
        index = const_array(g.consts[node.input[1]]).ravel() if node.input[1] in g.consts else []
        return [start + int(index[0]) % length] if len(index) == 1 and length else []
    if node.op_type == "Split":
        sizes = node.input[1] if len(node.input) > 1 else ""
        if sizes not in g.consts or attr(node, "axis", 0) != 0:
            return []
        sizes = [int(v) for v in const_array(g.consts[sizes]).ravel()]
        j = list(node.output).index(piece) if piece in node.output else -1
        if j < 0 or sum(sizes) != length:
            return []
        return list(range(start + sum(sizes[:j]), start + sum(sizes[:j + 1])))
    consts = {name: const_array(g.consts[name]) for name in node.input[1:] if name in g.consts}
    bounds = slice_bounds(node, consts, {node.input[0]: [length]})
    return list(range(start + bounds[1], start + bounds[2])) if bounds and bounds[2] > bounds[1] else []


def shape_entry(node, position: int, value: int, g: Graph) -> tuple[str, int] | str | None:
    """Where a Reshape's target shape holds entry *position*, expected to be *value*: the constant
    and its index to rewrite; None when the entry is -1 (the runtime works it out); else why it
    cannot be rewritten. PyTorch writes the shape as a Concat of the batch size and constants."""
    source, index = node.input[1], position
    if source not in g.consts:
        maker = g.made_by.get(source)
        pieces = list(maker.input) if maker is not None and maker.op_type == "Concat" else []
        for piece in pieces:
            length = g.consts[piece].dims[0] if piece in g.consts else (g.shapes.get(piece) or [None])[0]
            if length is None:
                break
            if index < length:
                source = piece
                break
            index -= length
    if source not in g.consts:
        return "Reshape with a shape it cannot rewrite"
    if g.uses[source] > 1:
        return "Reshape shape shared with another node"
    entry = int(const_array(g.consts[source]).ravel()[index])
    if entry == -1:
        return None
    return (source, index) if entry == value else "Reshape with a shape it cannot rewrite"


def concat_pieces(target: str, x: str, g: Graph) -> list | None:
    """A shape built by a Concat: its entries, ints for constants and ("dim", i) for x's dimension i
    read at run time; None where any piece is something else."""
    entries = concat_entries(target, x, g)
    return None if entries is None or None in entries else entries
