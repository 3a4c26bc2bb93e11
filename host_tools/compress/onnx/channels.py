"""Which channels of an ONNX graph can be removed, and removing them.

A prunable layer is a Conv (not grouped), Gemm or MatMul with a constant weight, or an embedding
(a Gather from a constant table). Its output channels can go when its *region* (``regions``:
everything computed from its output channel by channel, up to the weighted layers that read it)
ends only in such readers. Where a region meets another branch — a residual Add, a
squeeze-and-excitation gate's Mul — the other operand must lie in another layer's region: the
two layers' channels are then tied, and they form one *group* that loses the same channels (a
ResNet stage's width: its first convolution and every block's last one). Removing channel c of a
group means removing output channel c of each of its layers, input channel c of each reader (or
its c-th block of flattened features), entry c of every per-channel constant and channel c of
every depthwise convolution in its regions. A group with any member that cannot be pruned — a
region that reaches a graph output or an op it cannot follow, or meets a branch that no layer's
channels explain (the graph's input) — keeps its channels, and the plan records why for each
member. Channels joined by a Concat stay each their own layer's, at their offsets in the joined
tensor. An attention layer's unit is a head (``heads``): removing head h removes its block of
outputs in each section (Q, K, V) and rewrites the shape constants of the Reshapes that split
and merge the heads.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from host_tools.compress.onnx.boundary import consumers
from host_tools.compress.onnx import static_shapes
from host_tools.compress.onnx.layout import BINARY_OPS, Graph, Param, Reader, Region, attr
from host_tools.compress.onnx.regions import output_axis, walk_region, weight_of
from host_tools.compress import structured
from host_tools.compress.structured import UnionFind


@dataclass(frozen=True)
class Producer:
    node: str
    weight: str
    axis: int  # the weight's output-channel axis
    # unit c is outputs (o + c)·block + i for o in offsets: a head in each section (Q, K, V) of a fused
    # layer, or channel c of a window that starts at o
    offsets: tuple[int, ...] = (0,)
    block: int = 1


@dataclass
class Group:
    """Layers whose channels are pruned together, and everything their channels reach."""
    producers: list[Producer]
    channels: int
    params: list[tuple[str, Param]] = field(default_factory=list)  # (a constant may hold several windows)
    readers: list[Reader] = field(default_factory=list)
    depthwise: set[str] = field(default_factory=set)
    # (shape constant, entry, per unit[, where a window of the layer starts in the tensor reshaped])
    reshapes: list[tuple] = field(default_factory=list)
    segments: int = 1  # equal runs of the channels that each lose as many (a grouped Conv's groups)


@dataclass
class Plan:
    groups: list[Group]
    skipped: dict[str, str]  # node name -> why its channels stay
    shared: set[str] = field(default_factory=set)  # constants whose sharing kept a group whole

    def why_none(self) -> str:
        reasons = Counter(self.skipped.values())
        return "; ".join(f"{n} x {why}" for why, n in reasons.most_common(3)) or \
            "no Conv, Gemm or MatMul with a constant weight"

    def summary(self) -> str:
        """One line: what is pruned, and how much stays whole and why."""
        layers = sum(len(g.producers) for g in self.groups)
        line = f"{layers} layer{'s' * (layers != 1)} in {len(self.groups)} group{'s' * (len(self.groups) != 1)}"
        heads = sum(any(p.block > 1 for p in g.producers) for g in self.groups)
        line += f" ({heads} by attention heads)" if heads else ""
        return f"{line}; left whole: {len(self.skipped)} ({self.why_none()})" if self.skipped else line


def plan_channel_pruning(proto, exclude: set[str]) -> Plan:
    """Constants must be initializers (``initializers.hoist_constants``) to be seen as constants."""
    g = _graph(proto)
    regions: list[Region] = []
    labels: list[str] = []  # a layer's name, and its window when a Split divides it
    names: list[str] = []  # the layer's node
    weights: list[tuple[str, int, int]] = []  # (weight, output axis, window start): shared, one layer
    layers: list[tuple[int, int]] = []  # (node index, channels) of a layer walked whole; -1 for a window
    for index, node in enumerate(g.nodes):
        axis = output_axis(node, g.consts)
        if axis is None:
            continue
        weight = weight_of(node)
        channels = int(g.consts[weight].dims[axis])
        region = walk_region(index, channels, g)
        # a Split of all its channels: each part is a window of the layer, a pruning unit of its own
        parts = [(w, walk_region(index, channels, g, w)) for w in region.windows] if region.windows else \
            [(None, region)]
        for window, region in parts:
            labels.append(f"{node.name}[{window[0]}:{window[0] + window[1]}]" if window else node.name)
            if node.name in exclude:
                region.why = "excluded"
            regions.append(region)
            weights.append((weight, axis, window[0] if window else 0))
            layers.append((index if window is None else -1, channels))
            names.append(node.name)
    members = _grouped_queries(regions, weights, layers, g)
    producers = [Producer(name, weight, axis, region.out_offsets, region.out_block)
                 for name, (weight, axis, _), region in zip(names, weights, regions)]
    groups, skipped = [], {}
    for indices in members:
        why = _why_not(indices, labels, regions)
        if why:
            skipped.update((labels[i], regions[i].why or why) for i in indices)
            continue
        group = Group([producers[i] for i in indices], regions[indices[0]].channels,
                      segments=math.lcm(*(regions[i].segments for i in indices)))
        for i in indices:
            group.params += [p for p in regions[i].params.items() if p not in group.params]
            group.depthwise |= regions[i].depthwise
            # (a shape entry that layers tied by a residual Add reach shrinks once; windows of one
            # layer reaching its whole output's count each carry their start, so it shrinks for each)
            group.reshapes += [r for r in regions[i].reshapes if r not in group.reshapes]
            group.readers += [r for r in regions[i].readers.values() if r not in group.readers]
        groups.append((indices, group))
    shared = set()
    for indices, why, name in _shared_apart([(indices, group) for indices, group in groups], regions, g):
        skipped.update((labels[i], why) for i in indices)
        shared.add(name)
    kept = {id(group) for indices, group in groups if not any(labels[i] in skipped for i in indices)}
    return Plan([group for _, group in groups if id(group) in kept], skipped, shared)


def _shared_apart(groups: list[tuple[list[int], Group]], regions: list[Region], g: Graph):
    """(members, why, the constant) of each group that cannot cut a constant other nodes also read. A constant read
    by several nodes (a weight one layer applied twice shares, as ALBERT's; a table that is also an
    output layer's weight) is cut once for all of them: along each of its axes by one group only,
    in the same places, and every node reading it must be in that group."""
    cuts: dict[tuple[str, int], dict[int, set]] = {}  # (constant, axis) -> group -> (offsets, block)
    for n, (_, group) in enumerate(groups):
        for name, axis, where in [(p.weight, p.axis, (p.offsets, p.block)) for p in group.producers] + \
                [(r.weight, r.axis, (r.offsets, r.block)) for r in group.readers] + \
                [(name, q.axis, (q.offsets, q.block)) for name, q in group.params]:
            if g.uses[name] > 1:
                cuts.setdefault((name, axis), {}).setdefault(n, set()).add(where)
    refused: dict[int, tuple[str, str]] = {}
    for (name, _), by_group in cuts.items():
        if len(by_group) > 1:
            refused.update((n, (f"a weight it shares ({name}) would lose other channels for another layer", name))
                           for n in by_group)
            continue
        [(n, places)] = by_group.items()
        indices, group = groups[n]
        named = {p.node for p in group.producers} | {r.node for r in group.readers}
        reached = {t for i in indices for t in regions[i].tensors}
        outside = [node.name for node in g.readers.get(name, []) if node.name not in named
                   and not any(t in reached for t in node.input if t != name)]
        if len(places) > 1:
            refused[n] = (f"reads a weight it shares ({name}) in different places", name)
        elif outside:
            refused[n] = (f"a weight it shares with {outside[0]} would lose channels there too", name)
    return [(groups[n][0], why, name) for n, (why, name) in refused.items()]


def _graph(proto) -> Graph:
    graph = proto.graph
    dims, names = static_shapes.inferred(proto)

    consts = {i.name: i for i in graph.initializer}

    @functools.cache
    def probe() -> list[dict]:
        """Asked for once, the model runs twice for every operand inference cannot size, and every
        padding worked out at run time."""
        unsized = {t for n in graph.node if n.op_type in BINARY_OPS | {"Where", "Reshape", "Concat"}
                   for t in (*n.input, *n.output) if t in dims and None in dims[t] and len(dims[t]) >= 3}
        pads = {n.input[1] for n in graph.node if n.op_type == "Pad" and len(n.input) > 1 and n.input[1]
                and n.input[1] not in consts}
        return static_shapes.runs(proto, sorted(unsized | pads))

    def seen(name: str) -> list:
        found = probe()
        return [run[name] for run in found] if found and all(name in run for run in found) else []

    return Graph(list(graph.node), consts, dims,
                 Counter(name for node in graph.node for name in node.input), {o.name for o in graph.output},
                 consumers(graph), {name: node for node in graph.node for name in node.output}, names,
                 lambda name: [tuple(np.shape(v)) for v in seen(name)], seen)


def _grouped_queries(regions: list[Region], weights: list[tuple[str, int, int]], layers: list[tuple[int, int]],
                     g: Graph) -> list[list[int]]:
    """The regions tied into groups (``_tie``); first, each layer split into attention heads whose
    heads meet another layer's in other groupings is walked again with its heads taken m at a time
    (m = 2, 3, … dividing the head count), keeping the first grouping that ties: under
    grouped-query attention each K/V head is repeated for m query heads, and the query layer can
    only lose those m heads together. *regions* changes in place."""
    walked = [region.why for region in regions]

    def tie() -> list[list[int]]:
        for region, why in zip(regions, walked):
            region.why = why
        return _tie(regions, weights)

    members = tie()
    for i, (index, channels) in enumerate(layers):
        region = regions[i]
        if index < 0 or walked[i] or not region.why or region.out_block == 1 or \
                not region.why.startswith("its output meets another branch at MatMul"):
            continue
        for m in range(2, region.channels):
            if region.channels % m:
                continue
            coarser = walk_region(index, channels, g, coarse=m)
            if coarser.why:
                continue
            regions[i], walked[i] = coarser, None
            members = tie()
            if not regions[i].why:
                break
            regions[i], walked[i] = region, None
            members = tie()
    return members


def _tie(regions: list[Region], weights: list[tuple[str, int, int]]) -> list[list[int]]:
    """Groups of region indices whose channels are tied (union-find over where regions meet, and
    over layers that share their weight: one layer applied again); a meeting no region explains
    leaves its region's reason."""
    tied = UnionFind(len(regions))
    first: dict[tuple[str, int, int], int] = {}
    for i, key in enumerate(weights):
        tied.join(i, first.setdefault(key, i))
    owners: dict[str, list[int]] = {}
    for i, region in enumerate(regions):
        for tensor in region.tensors:
            owners.setdefault(tensor, []).append(i)
    for i, region in enumerate(regions):
        for tensor, layout, op in region.meets:
            others = [j for j in owners.get(tensor, []) if regions[j].tensors[tensor] == layout]
            if not others:
                region.why = region.why or f"its output meets another branch at {op} (a residual connection or a gate)"
            for j in others:
                tied.join(i, j)
    return tied.sets()


def _why_not(indices: list[int], labels: list[str], regions: list[Region]) -> str | None:
    """Why a group keeps its channels: the first reason of a member, told to the others too."""
    for i in indices:
        if regions[i].why:
            return regions[i].why if len(indices) == 1 else \
                f"tied to {labels[i]} ({regions[i].why})"
    if len({regions[i].channels for i in indices}) > 1:
        return "tied to layers of other widths"
    if regions[indices[0]].channels < 2:
        return "a single channel"
    segments = math.lcm(*(regions[i].segments for i in indices))
    if segments > 1 and any(regions[i].out_block != 1 or regions[i].coarse != 1 for i in indices):
        return "a grouped Conv's channels split into attention heads"
    if segments > 1 and (regions[indices[0]].channels % segments or regions[indices[0]].channels < 2 * segments):
        return f"a grouped Conv's {segments} groups leave fewer than two channels each"
    return None


def prune_channels(proto, plan: Plan, ratio: float, criterion: str) -> None:
    """Remove *ratio* of each group's channels, the least important by weight norm (summed over
    the group's layers, each scaled to a mean of 1; groups in graph order, each scored without the
    inputs the groups before it removed). Every group names the indices it removes from each
    tensor it touches; each tensor is then cut once, so groups whose channels were joined by a
    Concat each remove their own."""
    from onnx import numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    removed: dict[tuple[str, int], set[int]] = {}
    depthwise = set().union(*(g.depthwise for g in plan.groups))
    grouped = {node.input[1]: attr(node, "group", 1) for node in proto.graph.node
               if node.op_type == "Conv" and attr(node, "group", 1) > 1 and node.name not in depthwise}

    def scored(p: Producer) -> np.ndarray:
        """A producer's weight without the inputs that earlier groups (upstream, in graph order) removed
        (its outputs stay where they are: another window of the same layer may have lost some; a
        grouped Conv's are cut group by group, as they will be)."""
        array = numpy_helper.to_array(inits[p.weight])
        for (target, axis), gone in removed.items():
            if target == p.weight and axis != p.axis:
                array = structured.cut_grouped_inputs(array, grouped[target], gone, axis=1) if target in grouped \
                    else np.delete(array, sorted(gone), axis=axis)
        return array

    def drop(name: str, axis: int, gone, offsets=(0,), block: int = 1) -> None:
        removed.setdefault((name, axis), set()).update(
            int((o + c) * block + b) for o in offsets for c in gone for b in range(block))

    for group in plan.groups:
        score = np.zeros(group.channels)
        for p in group.producers:
            units = [[(o + c) * p.block + i for o in p.offsets for i in range(p.block)] for c in range(group.channels)]
            moved = np.moveaxis(scored(p), p.axis, 0)[units].reshape(group.channels, -1)
            norm = np.abs(moved).sum(axis=1) if criterion == "l1" else np.sqrt((moved ** 2).sum(axis=1))
            score += norm / (norm.mean() or 1.0)
        gone = structured.least_important(score, ratio, group.segments)
        for p in group.producers:
            drop(p.weight, p.axis, gone, p.offsets, p.block)
        for name, param in group.params:
            drop(name, param.axis, gone, param.offsets, param.block)
        for reader in group.readers:
            drop(reader.weight, reader.axis, gone, reader.offsets, reader.block)
        for name, entry, per_unit, *_ in group.reshapes:
            shape = numpy_helper.to_array(inits[name]).copy()
            shape.reshape(-1)[entry] -= len(gone) * per_unit
            inits[name].CopyFrom(numpy_helper.from_array(shape, name))
    arrays: dict[str, np.ndarray] = {}
    # axis 0 first: a grouped Conv's inputs are cut per group, once its rows (each group's outputs) are
    for (name, axis), gone in sorted(removed.items(), key=lambda item: item[0][1] != 0):
        array = arrays.get(name, numpy_helper.to_array(inits[name]))
        arrays[name] = structured.cut_grouped_inputs(array, grouped[name], gone, axis=1) \
            if name in grouped and axis == 1 else np.delete(array, sorted(gone), axis=axis)
    for name, value in arrays.items():
        inits[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value), name))
    for node in proto.graph.node:
        if node.name in depthwise:
            next(a for a in node.attribute if a.name == "group").i = int(arrays[node.input[1]].shape[0])
    # Shapes recorded for intermediate tensors are stale now; runtimes infer them again.
    del proto.graph.value_info[:]
