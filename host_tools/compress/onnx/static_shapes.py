"""Shape arithmetic known before running, made constant, so structured pruning can follow it.

PyTorch's exporter writes ``torch.chunk`` (YOLOv8's C2f takes its first convolution's output
apart with it) as Slices whose bounds are computed from a Shape at run time: the channel count
read, halved, multiplied back. The channel count is static even when the batch is not, so
``fold`` replaces such integer arithmetic with constants, and ``slices_as_split`` turns Slices
that tile one axis of a tensor into the single Split they amount to, whose sizes pruning can
rewrite. ``constant_subgraphs`` replaces whole computations on constants (DINOv2 interpolates
its position table at every run) with the values ONNX Runtime gives them. All leave what the graph
computes unchanged.
"""

from __future__ import annotations

import numpy as np

from host_tools.compress.onnx.initializers import drop_unused_initializers
from host_tools.compress.onnx.layout import attr, axes_of, const_array, ints

# Integer ops the shape arithmetic of exported graphs is made of.
FOLDABLE = {"Add", "Sub", "Mul", "Div", "Neg", "Max", "Min", "Unsqueeze", "Squeeze", "Concat", "Gather", "Cast"}
# Never replaced by their values: random draws differ run to run, and a quantized graph keeps its
# integer weights and their dequantization apart on purpose.
NOT_CONSTANT = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli",
                "DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear"}


def inferred_dims(model) -> dict[str, list]:
    """Every tensor's dimensions that ONNX shape inference knows (None where it does not), with data
    propagation, which follows the shapes PyTorch computes for Reshapes (batch, tokens, heads)."""
    return inferred(model)[0]


def inferred(model) -> tuple[dict[str, list], dict[str, list]]:
    """inferred_dims, and every tensor's symbolic dimensions by name (None where a dimension is a
    number or unknown): 'n' and 't' that the exporter named, or names inference gave sizes it could
    not work out, carried along, so two unknown sizes can still be known to be equal."""
    import onnx

    try:
        graph = onnx.shape_inference.infer_shapes(model, data_prop=True).graph
    except Exception:  # noqa: BLE001 — then only what plain inference knows
        graph = onnx.shape_inference.infer_shapes(model).graph
    values = (*graph.value_info, *graph.input, *graph.output)
    dims = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            for v in values}
    # (a size inference made up is named unk__N, and carried along like the others within one run)
    names = {v.name: [d.dim_param or None for d in v.type.tensor_type.shape.dim] for v in values}
    return dims, names


def runs(model, names: list[str]) -> list[dict[str, np.ndarray]]:
    """The tensors *names* when the model runs on made-up inputs twice, every size the graph leaves
    open 2 and then 3 (all values 0): for what inference cannot tell, such as a mask built at run
    time that is 1 along the heads whatever the input, or padding worked out from the sizes. Empty
    when the model does not run so (it needs real values, or sizes of its own)."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outputs = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names if n not in outputs)
    initializers = {i.name for i in probe.graph.initializer}
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 4
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        wanted = [o.name for o in session.get_outputs()]
        found = []
        for size in (2, 3):
            feeds = {}
            for value in probe.graph.input:
                if value.name in initializers:
                    continue
                kind = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
                dims = [d.dim_value if d.HasField("dim_value") else size for d in value.type.tensor_type.shape.dim]
                feeds[value.name] = np.zeros(dims, dtype=kind)
            found.append(dict(zip(wanted, session.run(wanted, feeds))))
    except Exception:  # noqa: BLE001 — any failure means: not known
        return []
    return found


def fold(model) -> int:
    """Replace integer shape arithmetic whose inputs are constants, or static dimensions read with
    Shape + Gather, with constants; returns how many nodes went."""
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    dims = inferred_dims(model)
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    shapes: dict[str, list] = {}  # a Shape's output -> the dimensions it reads (None: not static)
    folded = []
    for node in graph.node:
        value = None
        if node.op_type == "Shape" and not node.attribute and node.input[0] in dims:
            shapes[node.output[0]] = dims[node.input[0]]
        elif node.op_type == "Gather" and node.input[0] in shapes and node.input[1] in consts:
            read = np.take(np.array(shapes[node.input[0]], dtype=object), consts[node.input[1]])
            if None not in np.ravel(read):
                value = np.array(read, dtype=np.int64)
        elif node.op_type in FOLDABLE and all(name in consts for name in node.input if name) and \
                all(consts[name].dtype.kind in "iu" for name in node.input if name):
            try:  # (the reference runs today's opset: an older node's form may not run, and then stays)
                value = ReferenceEvaluator(node).run(None, {name: consts[name] for name in node.input if name})[0]
            except Exception:  # noqa: BLE001
                value = None
        if value is not None and np.asarray(value).dtype.kind in "iu":
            consts[node.output[0]] = np.asarray(value)
            graph.initializer.append(numpy_helper.from_array(np.asarray(value), node.output[0]))
            folded.append(node)
    for node in folded:
        graph.node.remove(node)
    used = {name for node in graph.node for name in node.input}
    unread = [n for n in graph.node if n.op_type == "Shape" and n.output[0] not in used]
    for node in unread:
        graph.node.remove(node)
    drop_unused_initializers(graph, {name for node in folded + unread for name in (*node.input, *node.output)})
    return len(folded)


def slices_as_split(model) -> int:
    """Replace Slices with constant bounds that together tile one axis of a tensor, in order and
    step 1, by one Split; returns how many Splits were made."""
    from onnx import helper, numpy_helper

    graph = model.graph
    dims = inferred_dims(model)
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    by_data: dict[tuple[str, int], list] = {}
    for node in graph.node:
        bounds = slice_bounds(node, consts, dims)
        if bounds and bounds[1] < bounds[2]:
            by_data.setdefault((node.input[0], bounds[0]), []).append((bounds[1], bounds[2], node))
    made = 0
    for (data, axis), slices in by_data.items():
        slices.sort(key=lambda s: s[0])
        width = dims[data][axis]
        if len(slices) < 2 or slices[0][0] != 0 or slices[-1][1] != width or \
                any(a[1] != b[0] for a, b in zip(slices, slices[1:])):
            continue
        sizes = f"{slices[0][2].output[0]}.split_sizes"
        graph.initializer.append(numpy_helper.from_array(np.array([e - s for s, e, _ in slices], np.int64), sizes))
        first = min(list(graph.node).index(node) for _, _, node in slices)
        split = helper.make_node("Split", [data, sizes], [node.output[0] for _, _, node in slices],
                                 name=f"{slices[0][2].name}.split", axis=axis)
        for _, _, node in slices:
            graph.node.remove(node)
        graph.node.insert(first, split)
        drop_unused_initializers(graph, {name for _, _, node in slices for name in node.input[1:]})
        made += 1
    return made


def split_sizes_written(model) -> int:
    """Split(x, num_outputs=n) (opset 18; torch.export splits GPT-2's fused QKV so) on an axis of known
    size as Split(x, sizes): the same parts (the last one smaller when the size does not divide, as
    ONNX says), in the form whose sizes pruning rewrites; returns how many."""
    from onnx import numpy_helper

    graph = model.graph
    dims = inferred_dims(model)
    taken = {i.name for i in graph.initializer}
    made = 0
    for node in graph.node:
        count = next((a.i for a in node.attribute if a.name == "num_outputs"), 0)
        shape = dims.get(node.input[0])
        if node.op_type != "Split" or not count or (len(node.input) > 1 and node.input[1]) or not shape:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0) % len(shape)
        if shape[axis] is None:
            continue
        chunk = -(-shape[axis] // count)
        sizes = [chunk] * (count - 1) + [shape[axis] - chunk * (count - 1)]
        name = f"{node.output[0]}.split_sizes"
        if name in taken or sizes[-1] <= 0:
            continue
        taken.add(name)
        graph.initializer.append(numpy_helper.from_array(np.array(sizes, np.int64), name))
        del node.input[1:]
        node.input.append(name)
        kept = [a for a in node.attribute if a.name != "num_outputs"]
        del node.attribute[:]
        node.attribute.extend(kept)
        made += 1
    return made


def slice_bounds(node, consts: dict, dims: dict) -> tuple[int, int, int] | None:
    """(axis, start, end) that a Slice of one axis, step 1, with constant bounds takes, clamped to
    the axis (start >= end: nothing); None for any other Slice. *consts*: name -> array; *dims*:
    name -> dimensions (those of the Slice's data are needed)."""
    if node.op_type != "Slice" or len(node.input) < 3 or any(name not in consts for name in node.input[1:] if name):
        return None
    shape = dims.get(node.input[0])
    starts, ends = consts[node.input[1]].ravel(), consts[node.input[2]].ravel()
    axes = consts[node.input[3]].ravel() if len(node.input) > 3 and node.input[3] else np.array([0])
    steps = consts[node.input[4]].ravel() if len(node.input) > 4 and node.input[4] else np.array([1])
    if not shape or len(starts) != 1 or len(ends) != 1 or len(axes) != 1 or steps.tolist() != [1] or \
            not -len(shape) <= int(axes[0]) < len(shape):
        return None
    axis = int(axes[0]) % len(shape)
    width = shape[axis]
    if width is None:
        return None
    start, end = (min(max(int(v) + width if v < 0 else int(v), 0), width) for v in (starts[0], ends[0]))
    return axis, start, end


def constant_subgraphs(model, slack_bytes: int = 4096) -> int:
    """Replace tensors computed from constants only with their values, as ONNX Runtime computes them
    (DINOv2 interpolates its position table to the image's patch grid at every run, BEiT looks its
    relative-position bias up in a table with constant indices): pruning then sees a per-channel or
    per-head constant where it saw an unknown branch. A value is taken when it is at most
    *slack_bytes* larger than the constants it is computed from, so the file does not grow (an
    attention mask built from a few numbers, or a broadcast, stays a computation); returns how many
    tensors became constants."""
    from onnx import helper, numpy_helper

    graph = model.graph
    sizes = {i.name: int(np.prod(i.dims)) * helper.tensor_dtype_to_np_dtype(i.data_type).itemsize
             for i in graph.initializer}
    inputs_of = set(sizes)
    computed: set[str] = set()
    for node in graph.node:
        given = [name for name in node.input if name]
        if given and node.op_type not in NOT_CONSTANT and not any(a.type in (5, 10) for a in node.attribute) and \
                all(name in inputs_of or name in computed for name in given):
            computed.update(name for name in node.output if name)
    outputs = {o.name for o in graph.output}
    frontier = sorted({name for node in graph.node if not set(node.output) & computed
                       for name in node.input if name in computed} - outputs)
    if not frontier:
        return 0
    found = runs(model, frontier)
    if not found:
        return 0
    made_by = {name: node for node in graph.node for name in node.output}

    def from_bytes(name: str) -> int:  # of the constants *name* is computed from
        seen, stack = set(), [name]
        while stack:
            for given in made_by[stack.pop()].input:
                if given in made_by and given not in seen:
                    stack.append(given)
                seen.add(given)
        return sum(sizes.get(given, 0) for given in seen)

    values = {name: found[0][name] for name in frontier
              if all(np.array_equal(run[name], found[0][name]) for run in found[1:])
              and found[0][name].nbytes <= from_bytes(name) + slack_bytes}
    if not values:
        return 0
    # the nodes no longer needed once those are constants (the initializers only they read go after them)
    needed = set(outputs) | {name for node in graph.node if not set(node.output) & computed for name in node.input}
    dead = []
    for node in reversed(graph.node):
        if set(node.output) <= computed and not (set(node.output) & needed - set(values)):
            dead.append(node)
        else:
            needed.update(node.input)
    for node in dead:
        graph.node.remove(node)
    graph.initializer.extend(numpy_helper.from_array(np.asarray(value), name) for name, value in values.items())
    drop_unused_initializers(graph, set(sizes))
    return len(values)


# -- nn.MultiheadAttention as torch.export writes it -----------------------------------------------
def packed_sections_as_split(model) -> int:
    """nn.MultiheadAttention's packed Q/K/V as torch.export writes it — x [..., S·E] reshaped to
    [..., S, E], the section axis moved to the front (Unsqueeze, Transpose, Squeeze) and each
    section taken with a Gather — as one Split of x's last axis into S parts of E: the same tensors,
    in the form the planner follows (GPT-2's fused QKV, split); returns how many."""
    from onnx import helper, numpy_helper

    from host_tools.compress.onnx.boundary import default_opset

    graph = model.graph
    if default_opset(model) < 13:  # (Split's sizes became an input in opset 13)
        return 0
    dims, consts, readers, outputs = _graph_facts(model)
    made, dropped = 0, set()
    for reshape in list(graph.node):
        target = _const_target(reshape, consts)
        shape = dims.get(reshape.input[0]) if target is not None else None
        if not shape or len(target) != len(shape) + 1 or shape[-1] is None:
            continue
        sections, width = target[-2], target[-1]
        if sections < 2 or width < 1 or sections * width != shape[-1] or not _leading_kept(target[:-2], shape[:-1]):
            continue
        chain = _only_chain(reshape.output[0], ("Unsqueeze", "Transpose", "Squeeze"), readers, outputs, consts)
        if chain is None or _moved(len(target), chain, consts) != [len(target) - 2, *range(len(target) - 2),
                                                                     len(target) - 1]:
            continue
        gathers = readers.get(chain[-1].output[0], [])
        picked = {}
        for gather in gathers:
            index = const_array(consts[gather.input[1]]) if gather.op_type == "Gather" and \
                gather.input[1] in consts else None
            if index is None or index.ndim or attr(gather, "axis", 0) != 0 or int(index) % sections in picked:
                break
            picked[int(index) % sections] = gather.output[0]
        if not gathers or len(picked) != len(gathers) or chain[-1].output[0] in outputs:
            continue
        sizes = f"{reshape.output[0]}.section_sizes"
        graph.initializer.append(numpy_helper.from_array(np.full(sections, width, np.int64), sizes))
        names = [picked.get(s, f"{reshape.output[0]}.section{s}") for s in range(sections)]
        split = helper.make_node("Split", [reshape.input[0], sizes], names, name=f"{reshape.name}.split",
                                 axis=len(shape) - 1)
        position = list(graph.node).index(reshape)
        for node in (reshape, *chain, *gathers):
            graph.node.remove(node)
            dropped.update(node.input[1:])
        _forget_shapes(graph, {reshape.output[0], *(node.output[0] for node in chain)})
        graph.node.insert(position, split)
        made += 1
    drop_unused_initializers(graph, dropped)
    return made


def folded_heads_unfolded(model) -> int:
    """nn.MultiheadAttention's heads folded into the batch axis, as torch.export writes them: q
    [T, B, E] reshaped to [T, B·H, d], transposed to [B·H, T, d] and reshaped to [B, H, T, d] — as q
    reshaped to [T, B, H, d] and transposed to [B, H, T, d]: the same tensor, with the heads on an
    axis of their own, whose count pruning rewrites; returns how many."""
    from onnx import helper, numpy_helper

    graph = model.graph
    dims, consts, readers, outputs = _graph_facts(model)
    made, dropped = 0, set()
    for first in list(graph.node):
        target, shape = _const_target(first, consts), dims.get(first.input[0])
        if target is None or len(target) != 3 or not shape or len(shape) != 3 or None in (shape[0], shape[2]):
            continue
        tokens, folded, size = target
        swap = _only_reader(first.output[0], readers, outputs)
        last = _only_reader(swap.output[0], readers, outputs) if swap is not None else None
        unfolded = _const_target(last, consts) if last is not None else None
        if swap is None or swap.op_type != "Transpose" or ints(swap, "perm") != [1, 0, 2] or unfolded is None or \
                len(unfolded) != 4 or tokens != shape[0] or size < 1 or shape[2] % size:
            continue
        batch, heads = unfolded[:2]
        if heads * size != shape[2] or unfolded[2:] != [tokens, size] or not (batch == -1 or batch > 0) or \
                not (folded == -1 or batch > 0 and folded == batch * heads):
            continue
        name = f"{first.output[0]}.heads_shape"
        graph.initializer.append(numpy_helper.from_array(np.array([tokens, batch, heads, size], np.int64), name))
        dropped.update((first.input[1], last.input[1]))
        _forget_shapes(graph, {first.output[0], swap.output[0]})  # (one changed, one gone)
        first.input[1] = name
        swap.output[0] = last.output[0]
        del swap.attribute[:]
        swap.attribute.append(helper.make_attribute("perm", [1, 2, 0, 3]))
        graph.node.remove(last)
        made += 1
    drop_unused_initializers(graph, dropped)
    return made


def _forget_shapes(graph, names: set[str]) -> None:
    """Drop the recorded shapes (value_info) of tensors a rewrite changed or removed."""
    for value in [v for v in graph.value_info if v.name in names]:
        graph.value_info.remove(value)


def _graph_facts(model):
    """(inferred_dims, initializers by name, each tensor's reading nodes, graph output names)."""
    graph = model.graph
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    consts = {i.name: i for i in graph.initializer}
    return inferred_dims(model), consts, readers, {o.name for o in graph.output}


def _const_target(node, consts) -> list[int] | None:
    """A Reshape's target shape when it is a constant (no 0 entries: copied or literal, both are out)."""
    if node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] not in consts:
        return None
    target = [int(v) for v in const_array(consts[node.input[1]]).ravel()]
    return None if 0 in target or target.count(-1) > 1 else target


def _leading_kept(entries: list[int], dims: list) -> bool:
    """Whether a Reshape's leading *entries* keep the input's leading *dims* as they are: each the
    same number, or the one -1 where the rest fixes it (the trailing entries take the last dim whole)."""
    return len(entries) == len(dims) and entries.count(-1) <= 1 and \
        all(e == -1 or d is not None and e == d for e, d in zip(entries, dims))


def _only_reader(name: str, readers, outputs):
    found = readers.get(name, [])
    return found[0] if len(found) == 1 and name not in outputs else None


def _only_chain(name: str, ops: tuple[str, ...], readers, outputs, consts) -> list | None:
    """The nodes *ops* in that order, each the only reader of the one before, starting at *name*."""
    chain = []
    for op in ops:
        node = _only_reader(name, readers, outputs)
        if node is None or node.op_type != op or any(i not in consts for i in node.input[1:]):
            return None
        chain.append(node)
        name = node.output[0]
    return chain


def _moved(rank: int, chain, consts) -> list | None:
    """Where Unsqueeze, Transpose, Squeeze take the axes 0..rank-1: the labels of the axes that come
    out, or None when the Squeeze removes anything but what the Unsqueeze added."""
    unsqueeze, transpose, squeeze = chain
    added = sorted(a % (rank + len(axes_of(unsqueeze, consts))) for a in axes_of(unsqueeze, consts))
    labels: list = list(range(rank))
    for a in added:
        labels.insert(a, None)
    perm = ints(transpose, "perm")
    if sorted(perm) != list(range(len(labels))):
        return None
    labels = [labels[p] for p in perm]
    gone = {a % len(labels) for a in axes_of(squeeze, consts)}
    if any(labels[a] is not None for a in gone) or len(gone) != len(added):
        return None
    return [label for i, label in enumerate(labels) if i not in gone]
