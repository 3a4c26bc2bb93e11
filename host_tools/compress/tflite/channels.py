"""Which channels of a float TFLite graph can be removed, and removing them: the TFLite counterpart
of ``onnx/channels``.

Each prunable layer's channels are walked (``regions``) to the layers that read them. Where the
channels meet another branch — a residual ADD, a gate's MUL — the other operand must carry another
layer's channels in the same places: the layers are then tied into a group that loses the same
channels (a ResNet stage's stream). Channels joined by a CONCATENATION stay each their own
layer's, at their offsets in the joined tensor. A group with a member whose channels reach a graph
output, an op it cannot follow or a branch no layer explains keeps them, and the plan says why.
Every tensor the channels pass through gets its new shape; reshape targets are rewritten, and a
constant another op also reads is copied first.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

from host_tools.compress import structured
from host_tools.compress.structured import UnionFind
from host_tools.compress.tflite.graph import Graph
from host_tools.compress.tflite.regions import Region, prunable, tiling, walked


@dataclass
class Plan:
    groups: list[list[Region]]  # layers that lose the same channels
    skipped: dict[str, str]  # layer -> why its channels stay
    # SLICEs that take windows of a layer's channels (YOLO's C2f split in two): each starts earlier by
    # what was removed before it, whether its own window loses channels or stays whole
    windows: frozenset[int] = frozenset()

    @property
    def regions(self) -> list[Region]:
        return [r for group in self.groups for r in group]

    def why_none(self) -> str:
        reasons = Counter(self.skipped.values())
        return "; ".join(f"{n} x {why}" for why, n in reasons.most_common(3)) or \
            "no CONV_2D or FULLY_CONNECTED with a constant weight"

    def summary(self) -> str:
        n, groups = len({r.layer for r in self.regions}), len(self.groups)
        line = f"{n} layer{'s' * (n != 1)}" + (f" in {groups} group{'s' * (groups != 1)}" if groups != n else "")
        return f"{line}; left whole: {len(self.skipped)} ({self.why_none()})" if self.skipped else line


def plan_channel_pruning(tree, exclude: set[str] = frozenset()) -> Plan:
    g = Graph(tree)
    choices: list[list[Region]] = []  # per layer, the ways of pruning it
    skipped, slices = {}, set()
    for k in range(len(g.ops)):
        found = prunable(g, k)
        if found is None:
            continue
        channels, weight = found.channels, g.input(k, found.weight)
        name = g.tensor(int(g.ops[k].outputs[0])).name
        label = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
        if label in exclude or g.label(k) in exclude:
            skipped[g.label(k)] = "excluded"
            continue
        if not g.float_weight(weight):
            skipped[g.label(k)] = "its weight is not float32 (prune before quantizing)"
            continue
        if channels < 2:
            skipped[g.label(k)] = "a single channel"
            continue
        region = walked(g, k, found, np.arange(channels)[:, None])
        windows = tiling(g, region)
        if region.windows and not windows:
            region.why = region.walk_why = f"sliced across its channels ({g.label(region.windows[0][0])})"
        path = region
        for window in windows or [None]:  # each window of a split layer is pruned on its own
            if window is not None:
                slices.add(window[0])
                window = (*window[:3], path)
                region = walked(g, k, found, np.arange(window[2])[:, None], window)
            # a reshape split the channels: whole groups of them (heads) instead, each way that gets through
            grouped = [r for r in (walked(g, k, found, units, window) for units in _coarser(region.splits))
                       if r.why is None]
            choices.append(grouped or [region])
    regions = _choose(choices)
    groups = []
    for members in _tie(regions):
        why = _why_not(g, members)
        if why:
            skipped.update((g.label(r.layer), r.why or why) for r in members)
        else:
            groups.append(members)
    _untangle(g, groups, skipped)
    return Plan(groups, skipped, frozenset(slices))


def _coarser(splits: list[np.ndarray]) -> list[np.ndarray]:
    """Each way of grouping the channels, then the same groups taken m at a time (m dividing their
    count): with grouped-query attention a K/V head serves a group of query heads, and the query
    projection can only lose whole groups."""
    found = []
    for units in splits:
        found.append(units)
        found += [units.reshape(len(units) // m, -1) for m in range(2, len(units)) if len(units) % m == 0]
    return found


def _choose(choices: list[list[Region]]) -> list[Region]:
    """One region per layer: the first way of grouping its channels, or a later one where the first
    meets another layer's channels in other places (query heads against grouped K/V heads). A layer
    that no way gets through is reported as its first way failed."""
    chosen = [0] * len(choices)
    regions: list[Region] = []
    for _ in range(sum(map(len, choices))):
        regions = [c[i] for c, i in zip(choices, chosen)]
        for region in regions:
            region.why = region.walk_why
        _tie(regions)
        advanced = False
        for n, region in enumerate(regions):
            if region.why and region.walk_why is None and chosen[n] + 1 < len(choices[n]):
                chosen[n] += 1
                advanced = True
        if not advanced:
            break
    final = []
    for n, region in enumerate(regions):
        if region.why and chosen[n]:
            region = choices[n][0]
        region.why = region.walk_why  # the plan ties them again
        final.append(region)
    return final


def _tie(regions: list[Region]) -> list[list[Region]]:
    """Regions whose channels meet, grouped; a meeting no region explains leaves its region's reason.
    Layers that share their weight (a layer applied again, as ALBERT's) are one layer: tied too."""
    tied = UnionFind(len(regions))
    by_weight: dict[tuple[int, int, int], int] = {}
    for i, region in enumerate(regions):
        j = by_weight.setdefault(region.weight, i)
        if j != i:
            tied.join(i, j)
    # the regions holding each tensor, by where they hold it: a meeting there ties a region to all of
    # them, so they are tied to each other once, and each meeting to the first (an unrolled LSTM's
    # steps meet the same tensors tens of thousands of times)
    def place(tensor: int, axis: int, positions: np.ndarray) -> tuple:
        return tensor, axis, positions.shape, np.ascontiguousarray(positions, np.int64).tobytes()

    holders: dict[tuple, list[int]] = {}
    for j, r in enumerate(regions):
        for tensor, (axis, positions) in r.tensors.items():
            holders.setdefault(place(tensor, axis, positions), []).append(j)
    joined: set[tuple] = set()
    for i, region in enumerate(regions):
        for tensor, axis, positions, op in region.meets:
            key = place(tensor, axis, positions)
            others = holders.get(key, [])
            if not others:
                region.why = region.why or f"its output meets another branch at {op} (a residual connection or a gate)"
                continue
            if key not in joined:
                joined.add(key)
                for j in others[1:]:
                    tied.join(others[0], j)
            tied.join(i, others[0])
    return [[regions[i] for i in members] for members in tied.sets()]


def _why_not(g: Graph, members: list[Region]) -> str | None:
    """Why a group keeps its channels: the first reason of a member, told to the others too."""
    for region in members:
        if region.why:
            return region.why if len(members) == 1 else f"tied to {g.label(region.layer)} ({region.why})"
    if len({r.channels for r in members}) > 1:
        return "tied to layers of other widths"
    segments = math.lcm(*(r.segments for r in members))
    if segments > 1 and any(r.edits[0][3].shape[1] != 1 or r.windows for r in members):
        return "a grouped CONV_2D's channels split into heads or windows"
    if segments > 1 and (members[0].channels % segments or members[0].channels < 2 * segments):
        return f"a grouped CONV_2D's {segments} groups leave fewer than two channels each"
    return None


def _untangle(g: Graph, groups: list[list[Region]], skipped: dict[str, str]) -> None:
    """Groups lose their channels each on its own, so two that share a tensor must hold different
    places in it (a CONCATENATION's inputs); where they overlap, both keep their channels."""
    places: dict[int, list[tuple[int, int, set]]] = {}
    for n, group in enumerate(groups):
        for region in group:
            for t, (axis, positions) in region.tensors.items():
                places.setdefault(t, []).append((n, axis, set(positions.ravel().tolist())))
    tangled = set()
    for holders in places.values():
        for i, (n, axis, where) in enumerate(holders):
            for m, other_axis, other in holders[i + 1:]:
                if m != n and (axis != other_axis or where & other):
                    tangled |= {n, m}
    for n in sorted(tangled, reverse=True):
        for region in groups.pop(n):
            skipped[g.label(region.layer)] = "its channels meet another layer's"


def prune_channels(tree, plan: Plan, ratio: float, criterion: str = "l1") -> None:
    """Remove *ratio* of each group's channels, the least important by weight norm (summed over the
    group's layers, each scaled to a mean of 1)."""
    g = Graph(tree)
    removals: dict[tuple[int, int], dict[int, set[int]]] = {}  # (op, input) -> axis -> indices
    shrink: dict[int, dict[int, set[int]]] = {}  # tensor -> axis -> indices removed along it
    targets: set[tuple[int, int]] = set()
    for group in plan.groups:
        channels = group[0].channels
        score = np.zeros(channels)
        for region in group:
            k, position, axis, units = region.edits[0]  # each unit by its own rows (a head's, in Q, K and V)
            weight = np.moveaxis(g.const(g.input(k, position)), axis, 0)[units].reshape(channels, -1)
            norm = np.abs(weight).sum(1) if criterion == "l1" else np.sqrt((weight ** 2).sum(1))
            score += norm / (norm.mean() or 1.0)
        gone = structured.least_important(score, ratio, math.lcm(*(r.segments for r in group)))
        keep = channels - len(gone)
        for region in group:
            for k, position, axis, positions in region.edits:
                removals.setdefault((k, position), {}).setdefault(axis, set()).update(positions[gone].ravel().tolist())
            for t, (axis, positions) in region.tensors.items():
                shrink.setdefault(t, {}).setdefault(axis, set()).update(positions[gone].ravel().tolist())
            targets |= region.targets
            if g.kinds[region.layer] == "DEPTHWISE_CONV_2D":
                g.ops[region.layer].builtinOptions.depthMultiplier = keep
    _cut(g, removals, {k: g.conv_groups(k) for k, kind in enumerate(g.kinds) if kind == "CONV_2D"})
    for k in plan.windows:  # a window of a layer's channels starts earlier by what was removed before it
        t, axis = g.input(k, 0), len(g.shape(g.input(k, 0))) - 1
        begin = g.const(g.input(k, 1)).copy()
        earlier = sum(i < begin[axis] for i in shrink.get(t, {}).get(axis, ()))
        if earlier:
            begin[axis] -= earlier
            g.store(g.own(k, 1), begin)
    for k, position in targets:  # a shape constant follows the output's shape: its own copy, rewritten
        fewer = shrink.get(int(g.ops[k].outputs[0]), {})
        _shrink_target(g, k, position, {axis: len(gone) for axis, gone in fewer.items()})
    for t, by_axis in shrink.items():
        tensor = g.tensor(t)
        for axis, indices in by_axis.items():
            tensor.shape[axis] -= len(indices)
            if tensor.shapeSignature is not None and len(tensor.shapeSignature) and tensor.shapeSignature[axis] > 0:
                tensor.shapeSignature[axis] -= len(indices)


def _cut(g: Graph, removals: dict[tuple[int, int], dict[int, set[int]]], groups: dict[int, int]) -> None:
    """Delete the entries *removals* names from the constants ops read (a CONV_2D's filter in its
    *groups*: the input channels, numbered across them, cut group by group). A constant that every op
    reading it loses the same entries of (a weight two tied layers share, an embedding table read
    again as the output layer's weight) is cut once and stays shared; else each op cuts its own copy."""
    users: dict[int, list[tuple[int, int]]] = {}  # buffer -> the (op, input) pairs with removals
    for k, position in removals:
        users.setdefault(g.tensor(g.input(k, position)).buffer, []).append((k, position))
    for buffer, pairs in users.items():
        tensors = [t for t, tensor in enumerate(g.graph.tensors) if tensor.buffer == buffer]
        readers = {reader for t in tensors for reader in g.consumers.get(t, [])}
        axes = removals[pairs[0]]
        if readers == set(pairs) and all(removals[pair] == axes for pair in pairs) and \
                len({tuple(g.shape(t)) for t in tensors}) == 1:
            array = _without(g.const(tensors[0]), axes, groups.get(pairs[0][0], 1) if pairs[0][1] == 1 else 1)
            for t in tensors:
                g.store(t, array)
            continue
        for k, position in pairs:
            t = g.own(k, position)
            g.store(t, _without(g.const(t), removals[(k, position)], groups.get(k, 1) if position == 1 else 1))


def _without(array: np.ndarray, axes: dict[int, set[int]], groups: int = 1) -> np.ndarray:
    """*array* without the entries *axes* names; a grouped filter [out, h, w, in / groups] loses its
    rows first, then each group's own input channels."""
    for axis, indices in sorted(axes.items(), key=lambda item: groups > 1 and item[0] == 3):
        array = structured.cut_grouped_inputs(array, groups, indices, axis) if groups > 1 and axis == 3 else \
            np.delete(array, sorted(indices), axis=axis)
    return array


def stale_shape_constants(tree) -> dict[str, str]:
    """RESHAPE targets and SLICE sizes that do not say what their output's recorded shape says (a
    runtime may go by either: the XNNPACK delegate ran a SLICE whose size was stale), by op."""
    g = Graph(tree)
    stale = {}
    for k, kind in enumerate(g.kinds):
        if kind in ("RESHAPE", "SLICE"):
            target = g.const(g.input(k, 1 if kind == "RESHAPE" else 2))
            out = g.shape(int(g.ops[k].outputs[0]))
            if target is not None and target.ndim == 1 and len(target) == len(out) and \
                    any(t != -1 and t != o for t, o in zip(target.tolist(), out)):
                stale[g.label(k)] = f"{g.label(k)} says {target.tolist()}, its output {out}"
    return stale


def _shrink_target(g: Graph, k: int, position: int, fewer: dict[int, int]) -> None:
    options = g.ops[k].builtinOptions
    for entry, n in fewer.items():
        if g.kinds[k] == "RESHAPE" and options is not None and options.newShape is not None \
                and len(options.newShape) > entry and options.newShape[entry] > 0:
            options.newShape[entry] -= n
    t = g.own(k, position)
    target = g.const(t)
    if target is not None and target.ndim == 1:
        target = target.copy()
        for entry, n in fewer.items():
            if target[entry] > 0:
                target[entry] -= n
        g.store(t, target)
