"""Initializers and constants edited so that the passes see weights as weights and can change one
layer's constants alone: weights out of Constant nodes and out of the graph's inputs, Identity
copies inlined, equal tensors stored once again, and shared vectors and shape constants copied
per reader before pruning; and the names those copies get."""

from __future__ import annotations

import hashlib
from collections import Counter

from host_tools.compress.onnx.boundary import has_subgraphs


def drop_initializer_inputs(model) -> int:
    """Older exporters (IR < 4) list every initializer as a graph input too; optimizers then treat
    them as inputs a caller must feed. Keep only the real inputs; returns how many went."""
    initializers = {i.name for i in model.graph.initializer}
    extra = [i for i in model.graph.input if i.name in initializers]
    for value in extra:
        model.graph.input.remove(value)
    if extra and model.ir_version < 4:
        model.ir_version = 4
    return len(extra)


def hoist_constants(model) -> int:
    """Turn Constant nodes that hold a tensor into initializers (as exporters often write weights),
    so quantizers see the weights; returns how many moved."""
    graph = model.graph
    moved = []
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            graph.initializer.append(_renamed_copy(node.attribute[0].t, node.output[0]))
            moved.append(node)
    for node in moved:
        graph.node.remove(node)
    return len(moved)


def inline_constant_identities(model) -> int:
    """Remove Identity nodes that copy an initializer; returns how many went. PyTorch's exporter
    writes them for equal constants, e.g. the biases of BatchNorms folded into convolutions: a
    vector gets a copy of its own, so that each layer's parameter can change on its own. And it
    writes them for a weight that one layer applied twice shares (ALBERT): a weight matrix's
    readers read the one weight, so that pruning sees it shared (pruning its copies apart would
    store it twice)."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    inlined = [n for n in graph.node if n.op_type == "Identity" and n.input and n.input[0] in inits]
    shared: dict[str, str] = {}
    outputs, subgraphs = {o.name for o in graph.output}, has_subgraphs(graph)  # names left as they are
    for node in inlined:
        source = inits[node.input[0]]
        if len(source.dims) >= 2 and not subgraphs and node.output[0] not in outputs:
            shared[node.output[0]] = source.name
        else:
            graph.initializer.append(_renamed_copy(source, node.output[0]))
        graph.node.remove(node)
    for node in graph.node:
        node.input[:] = [shared.get(name, name) for name in node.input]
    drop_unused_initializers(graph, {node.input[0] for node in inlined})
    return len(inlined)


def share_equal_initializers(graph) -> int:
    """Initializers equal in type, shape and value become one, read by all their readers; returns
    how many went. The undoing of inline_constant_identities where a copy stayed as it was: a weight
    the exporter shared between layers (ALBERT's repeated layer) is stored once again."""
    from onnx import TensorProto, numpy_helper

    if has_subgraphs(graph):  # their nodes may read the outer names; not worth following
        return 0
    fixed = {v.name for v in (*graph.input, *graph.output)}
    first: dict[tuple, str] = {}
    same: dict[str, str] = {}
    for init in graph.initializer:
        if init.name in fixed or init.data_location == TensorProto.EXTERNAL:
            continue
        value = numpy_helper.to_array(init)
        key = (init.data_type, tuple(init.dims), hashlib.sha256(value.tobytes()).digest())
        if key in first:
            same[init.name] = first[key]
        else:
            first[key] = init.name
    if same:
        for node in graph.node:
            node.input[:] = [same.get(name, name) for name in node.input]
        drop_unused_initializers(graph, set(same))
    return len(same)


def drop_unused_initializers(graph, names: set[str]) -> None:
    """Remove the initializers among *names* that no node, graph output or graph input names any more."""
    used = {name for node in graph.node for name in node.input} | {v.name for v in (*graph.output, *graph.input)}
    for init in [i for i in graph.initializer if i.name in names and i.name not in used]:
        graph.initializer.remove(init)


def _renamed_copy(tensor, name: str):
    copy = type(tensor)()
    copy.CopyFrom(tensor)
    copy.name = name
    return copy


# TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16: the initializers that hold weights (and train)
FLOAT_TYPES = (1, 10, 11, 16)


def _own_shape_concats(graph, taken: set[str]) -> int:
    """A Concat of constants and sizes read at run time that is the target shape of several Reshapes
    or Expands: each of them after the first gets a copy of it, put right after it. (ONNX Runtime
    merges equal nodes again when it loads the model.)"""
    shaped: dict[str, list] = {}
    for node in graph.node:
        if node.op_type in ("Reshape", "Expand") and len(node.input) > 1:
            shaped.setdefault(node.input[1], []).append(node)
    copies = 0
    for concat in [n for n in graph.node if n.op_type == "Concat" and len(shaped.get(n.output[0], [])) > 1]:
        at = list(graph.node).index(concat)
        for k, reader in enumerate(shaped[concat.output[0]][1:], start=1):
            clone = type(concat)()
            clone.CopyFrom(concat)
            clone.output[0] = fresh_name(concat.output[0], taken)
            clone.name = f"{concat.name}.{k}" if concat.name else ""
            graph.node.insert(at + k, clone)
            reader.input[1] = clone.output[0]
            copies += 1
    return copies


def whole_shapes(model) -> int:
    """Shape(x, start=0), as torch.export writes every read of a whole shape, as Shape(x): the same
    value, in the one form the pruning planner looks for; returns how many."""
    count = 0
    for node in model.graph.node:
        if node.op_type == "Shape" and node.attribute and \
                all(a.name == "start" and a.i == 0 for a in node.attribute):
            del node.attribute[:]
            count += 1
    return count


def own_small_constants(model, names: set[str]) -> int:
    """Give each node that reads one of *names* — float vectors (biases, norm scales; at most one axis)
    — its own copy: torch.export's optimizer stores equal constants once, so the zero biases and unit
    LayerNorm scales of layers that have nothing else in common are one initializer. Returns how many
    copies were made; what pruning leaves equal is shared again afterwards (share_equal_initializers)."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer if i.name in names and _float_vector(i)}
    taken = value_names(graph)
    seen: set[str] = set()
    copies = 0
    for index, node in enumerate(graph.node):
        for k, name in enumerate(node.input):
            if name not in inits:
                continue
            if name in seen:
                graph.initializer.append(_renamed_copy(inits[name], fresh_name(f"{name}.{node.name or index}", taken)))
                node.input[k] = graph.initializer[-1].name
                copies += 1
            seen.add(name)
    return copies


def shared_vectors(graph) -> set[str]:
    """Float initializers of at most one axis (biases, norm scales) that several nodes read."""
    uses = Counter(name for node in graph.node for name in set(node.input))
    return {i.name for i in graph.initializer if _float_vector(i) and uses[i.name] > 1}


def _float_vector(init) -> bool:
    return len(init.dims) <= 1 and init.data_type in FLOAT_TYPES


def value_names(graph) -> set[str]:
    """Every name a value of *graph* has: initializers, node outputs, graph inputs and outputs."""
    return {i.name for i in graph.initializer} | {name for node in graph.node for name in node.output} | \
        {v.name for v in (*graph.input, *graph.output)}


def fresh_name(name: str, taken: set[str]) -> str:
    """*name*, or *name* with a number after it, that is not in *taken* (which gets it)."""
    fresh, n = name, 0
    while fresh in taken:
        n += 1
        fresh = f"{name}.{n}"
    taken.add(fresh)
    return fresh


def own_shape_constants(model) -> int:
    """Give each Split, Reshape, Expand and Concat its own copy of an integer constant it shares with
    other nodes (PyTorch's exporter shares equal split sizes and shape pieces this way), and each
    Reshape and Expand its own copy of a Concat that builds its target shape (torch.export builds
    one for equal targets in different layers), so that pruning can rewrite one node's sizes alone;
    returns how many copies were made."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    taken = value_names(graph)
    copies = _own_shape_concats(graph, taken)
    uses = Counter(name for node in graph.node for name in node.input)
    for index, node in enumerate(graph.node):
        if node.op_type not in ("Split", "Reshape", "Expand", "Concat"):
            continue
        for k, name in enumerate(node.input):
            if name in inits and uses[name] > 1 and inits[name].data_type in (6, 7):  # INT32, INT64
                # (a node reading it twice, torch.export's [n, 2, 2, t, d], gets a copy for each)
                copy = fresh_name(f"{name}.{node.name or index}", taken)
                graph.initializer.append(_renamed_copy(inits[name], copy))
                node.input[k] = copy
                uses[name] -= 1
                copies += 1
    return copies
