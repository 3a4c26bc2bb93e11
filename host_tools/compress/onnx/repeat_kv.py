"""repeat_kv, as Hugging Face writes it for grouped-query attention: each K/V head repeated for the
m query heads it serves (see ``heads``, which walks heads through it as units of m)."""

from __future__ import annotations

from dataclasses import dataclass

from host_tools.compress.onnx.layout import Graph, Layout, axes_of
from host_tools.compress.onnx.shape_targets import built_from, count_read, written_count


@dataclass(frozen=True)
class Repeat:
    """repeat_kv, as Hugging Face writes it for grouped-query attention: h [n, kv, t, d] to
    h[:, :, None].expand(n, kv, m, t, d).reshape(n, kv·m, t, d), each head m times in a row, with
    the K/V head count read from h's shape at run time (so it follows the pruning), or written as
    constants kv and kv·m (torch.export), which the pruning rewrites (*written*)."""
    unsqueeze: object
    expand: object
    reshape: object
    times: int
    expand_shape: object  # the Concat each target is built from
    reshape_shape: object
    written: tuple = ()  # (node, the head count its target holds as a constant, heads per K/V head there)


def repeat_of(tensor: str, layout: Layout, g: Graph) -> Repeat | None:
    """The repeat_kv of *tensor* (heads on axis ``layout.at``), or None if it is not repeated so."""
    at, rank = layout.at, layout.rank
    for node in g.readers.get(tensor, []):
        if node.op_type != "Unsqueeze" or node.input[0] != tensor:
            continue
        if [a % (rank + 1) for a in axes_of(node, g.consts)] != [at + 1]:
            continue
        expand = g.only_reader(node.output[0], "Expand")
        reshape = expand and g.only_reader(expand.output[0], "Reshape")
        if not reshape or expand.input[0] != node.output[0] or reshape.input[0] != expand.output[0]:
            return None
        runs = list(zip(g.run_sizes(expand.output[0]), g.run_sizes(reshape.output[0])))
        times = {e[at + 1] for e, _ in runs if len(e) == rank + 1}
        if not runs or len(times) != 1 or not all(
                len(e) == rank + 1 and len(r) == rank and r[at] == e[at] * e[at + 1] and
                r[:at] == e[:at] and r[at + 1:] == e[at + 2:] for e, r in runs):
            return None
        times = times.pop()
        expand_shape, reshape_shape = built_from(expand.input[1], g), built_from(reshape.input[1], g)
        if times < 2 or expand_shape is None or reshape_shape is None:
            return None
        kv = runs[0][0][at]
        written = []
        for target, shape, m in ((expand, expand_shape, 1), (reshape, reshape_shape, times)):
            read = count_read(shape, at, tensor, g)
            if read is None and written_count(shape, at, g) == kv * m and all(e[at] == kv for e, _ in runs):
                written.append((target, kv * m, m))
            elif read != m:
                return None
        return Repeat(node, expand, reshape, times, expand_shape, reshape_shape, tuple(written))
    return None


def repeat_reads(reader, tensor: str, layout: Layout, g: Graph) -> bool:
    """Whether *reader* (a Gather of *tensor*'s shape) takes the head count only for its repeat_kv."""
    repeat = repeat_of(tensor, layout, g)
    if repeat is None:
        return False
    pieces = {repeat.expand_shape.input[layout.at], repeat.reshape_shape.input[layout.at]}
    reached = set()
    for user in g.readers.get(reader.output[0], []):
        if user.op_type == "Mul":
            user = g.only_reader(user.output[0], "Unsqueeze")
        if user is None or user.op_type != "Unsqueeze" or user.output[0] not in pieces:
            return False
        reached.add(user.output[0])
    return reached == pieces
