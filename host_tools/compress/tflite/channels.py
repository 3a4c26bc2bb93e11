"""Which channels of a float TFLite graph can be removed, and removing them: the TFLite counterpart
of ``onnx/channels``.

TFLite keeps channels on the last axis (NHWC). A prunable layer is a CONV_2D or FULLY_CONNECTED
with a constant float32 weight, a DEPTHWISE_CONV_2D over one input channel (how converters write
a first convolution over a grey image), or an embedding (a GATHER or EMBEDDING_LOOKUP of rows of a
constant table). Its output channels can go when everything computed from
them channel by channel — activations, pooling, a per-channel constant added or multiplied, a
depthwise convolution, a MEAN over other axes (or over the channels: a LayerNorm's statistics,
computed from fewer channels, as recovery then trains for), padding of other axes, and reshapes and transposes
that keep each channel's values on one axis (the flatten before a classifier) — ends in layers
that read them: a CONV_2D or FULLY_CONNECTED, whose matching input channels (or blocks of
flattened features) go too. Where the channels meet another branch — a residual ADD, a gate's
MUL — the other operand must carry another layer's channels in the same places: the layers are
then tied into a group that loses the same channels (a ResNet stage's stream). Channels joined
by a CONCATENATION stay each their own layer's, at their offsets in the joined tensor. A group
with a member whose channels reach a graph output, an op it cannot follow or a branch no layer
explains keeps them, and the plan says why. Every tensor the channels pass through gets its new
shape; reshape targets are rewritten, and a constant another op also reads is copied first.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from host_tools.compress import structured
from host_tools.compress.structured import UnionFind
from host_tools.compress.tflite import flatbuffer

UNARY = {"RELU", "RELU6", "RELU_N1_TO_1", "RELU_0_TO_1", "LOGISTIC", "TANH", "GELU", "HARD_SWISH", "LEAKY_RELU",
         "ELU", "ABS", "NEG", "EXP", "SQUARE", "SQRT", "RSQRT", "SIN", "COS", "FLOOR", "CEIL", "ROUND", "SIGN",
         "DEQUANTIZE"}
BINARY = {"ADD", "SUB", "MUL", "DIV", "MAXIMUM", "MINIMUM", "SQUARED_DIFFERENCE", "POW"}
# pooling and resizing of NHWC feature maps: each channel on its own
POOLS = {"MAX_POOL_2D", "AVERAGE_POOL_2D", "L2_POOL_2D", "RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR"}
REDUCERS = {"MEAN", "SUM", "REDUCE_MAX", "REDUCE_MIN", "REDUCE_PROD"}
PADS = {"PAD", "PADV2", "MIRROR_PAD"}
SHAPE_ONLY = {"RESHAPE", "SQUEEZE", "EXPAND_DIMS"}
FLOAT32 = 0
# TFLite TensorType -> NumPy dtype, for the constants read here
DTYPES = {0: np.float32, 1: np.float16, 2: np.int32, 3: np.uint8, 4: np.int64, 6: np.bool_, 7: np.int16, 9: np.int8,
           10: np.float64}


@dataclass
class Region:
    """One layer's output channels (or one part of them, when SLICEs split the layer) and everything
    they reach, pruned by units: a channel each, or groups of channels (an attention head). Positions
    are an array [units, k]: where unit u's k values sit along a tensor's channel axis (k > 1 once
    flattened, or for a head)."""
    layer: int  # operator index
    channels: int  # units
    tensors: dict[int, tuple[int, np.ndarray]] = field(default_factory=dict)  # tensor -> (axis, positions)
    # (operator, input position, axis, positions): constants that lose the channels' entries
    edits: list[tuple[int, int, int, np.ndarray]] = field(default_factory=list)
    # (operator, input position): shape constants (a RESHAPE's target, a SLICE's size) that follow the
    # operator's output when it loses channels
    targets: set[tuple[int, int]] = field(default_factory=set)
    # when a reshape splits the channels (into sections, heads, head dims): the channels grouped by
    # their index along each new axis, to try again with whole groups as the unit (an attention head)
    splits: list[np.ndarray] = field(default_factory=list)
    # (tensor, its axis, positions, op): another operand met, which must carry tied channels
    meets: list[tuple[int, int, np.ndarray, str]] = field(default_factory=list)
    why: str | None = None
    walk_why: str | None = None  # why the walk itself stopped (``why`` may be set later, by the ties)
    # SLICEs that take windows of the layer's channels (a fused Q/K/V projection split in three):
    # (operator, first channel, count, the tensor sliced)
    windows: list[tuple[int, int, int, int]] = field(default_factory=list)
    begins: set[int] = field(default_factory=set)  # SLICE operators whose window starts later once pruned
    # CONCATENATIONs along the channels, by operator: input position -> (tensor, axis, positions) of
    # each input the walk brought there; joined once the walk has nothing else to follow
    joins: dict[int, dict[int, tuple[int, int, np.ndarray]]] = field(default_factory=dict)
    # statistics of the channels and other axes together (a GroupNorm's mean and variance), by tensor:
    # the axis and positions the channels had where they were taken, for a broadcast back to them
    stats: dict[int, tuple[int, np.ndarray]] = field(default_factory=dict)
    # the buffer of the layer's weight, its channel axis and the window's first channel: layers that
    # share a weight (as layers: the same axis, the same window) lose the same channels
    weight: tuple[int, int, int] = (-1, 0, 0)
    # the channels fall into this many equal runs that must each lose as many: the groups of a
    # grouped CONV_2D that the layer is, or that reads its channels
    segments: int = 1


@dataclass
class Plan:
    groups: list[list[Region]]  # layers that lose the same channels
    skipped: dict[str, str]  # layer -> why its channels stay

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


class Graph:
    """The first subgraph of a TFLite object tree, with what the planner asks of it."""

    def __init__(self, tree) -> None:
        self.tree = tree
        self.graph = tree.subgraphs[0]
        self.ops = list(self.graph.operators)
        self.kinds = [flatbuffer.op_name(c.builtinCode, c.deprecatedBuiltinCode)
                      for c in (tree.operatorCodes[op.opcodeIndex] for op in self.ops)]
        self.consumers: dict[int, list[tuple[int, int]]] = {}
        for k, op in enumerate(self.ops):
            for position, t in enumerate(op.inputs):
                if t >= 0:
                    self.consumers.setdefault(int(t), []).append((k, position))
        self.outputs = {int(t) for t in self.graph.outputs}
        self.made_by = {int(t): k for k, op in enumerate(self.ops) for t in op.outputs}
        self.buffer_uses = Counter(t.buffer for t in self.graph.tensors)

    def label(self, k: int) -> str:
        return f"{self.kinds[k]} #{k}"

    def tensor(self, t: int):
        return self.graph.tensors[t]

    def shape(self, t: int) -> list[int]:
        shape = self.tensor(t).shape
        return [int(d) for d in shape] if shape is not None else []

    def stored(self, t: int) -> bool:
        """Whether tensor *t* is a constant the file holds (without reading its bytes out)."""
        if t < 0:
            return False
        data = self.tree.buffers[self.tensor(t).buffer].data
        return data is not None and len(data) > 0 and self.tensor(t).type in DTYPES

    def const(self, t: int) -> np.ndarray | None:
        if not self.stored(t):
            return None
        tensor = self.tensor(t)
        data = self.tree.buffers[tensor.buffer].data
        return np.frombuffer(bytes(data), DTYPES[tensor.type]).reshape(self.shape(t))

    def float_weight(self, t: int) -> bool:
        return self.const(t) is not None and self.tensor(t).type == FLOAT32

    def input(self, k: int, position: int) -> int:
        inputs = self.ops[k].inputs
        return int(inputs[position]) if position < len(inputs) else -1


@dataclass(frozen=True)
class Producer:
    """Where a prunable layer keeps its weight, and which of the weight's axes are its output channels."""
    weight: int  # input position
    axis: int
    channels: int
    bias: int | None  # input position
    groups: int = 1  # a grouped CONV_2D's groups


def _producer(g: Graph, k: int) -> Producer | None:
    """A prunable layer's weight; None for any other op."""
    kind = g.kinds[k]
    if kind in ("GATHER", "EMBEDDING_LOOKUP"):  # an embedding: rows of a table, one per token
        position = 0 if kind == "GATHER" else 1
        table = g.input(k, position)
        axis = g.ops[k].builtinOptions.axis if kind == "GATHER" and g.ops[k].builtinOptions is not None else 0
        shape = g.shape(table)
        if not g.float_weight(table) or len(shape) != 2 or axis != 0:  # (an integer table is a lookup, not a layer)
            return None
        return Producer(position, 1, shape[1], None)
    weight = g.input(k, 1)
    if kind not in ("CONV_2D", "FULLY_CONNECTED", "DEPTHWISE_CONV_2D") or g.const(weight) is None:
        return None
    shape = g.shape(weight)
    inputs = g.shape(g.input(k, 0))
    bias = 2 if g.const(g.input(k, 2)) is not None else None
    if kind == "DEPTHWISE_CONV_2D":
        return Producer(1, 3, shape[3], bias) if inputs and inputs[-1] == 1 else None
    if kind == "CONV_2D" and inputs and inputs[-1] != shape[-1]:  # a grouped convolution: [out, h, w, in / groups]
        groups = _conv_groups(g, k)
        return Producer(1, 0, shape[0], bias, groups) if inputs[-1] % shape[-1] == 0 and shape[0] % groups == 0 \
            else None
    if not inputs or inputs[-1] != shape[-1]:
        return None
    return Producer(1, 0, shape[0], bias) if kind == "CONV_2D" or len(shape) == 2 else None


def plan_channel_pruning(tree, exclude: set[str] = frozenset()) -> Plan:
    g = Graph(tree)
    choices: list[list[Region]] = []  # per layer, the ways of pruning it
    skipped = {}
    for k in range(len(g.ops)):
        found = _producer(g, k)
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
        region = _walked(g, k, found, np.arange(channels)[:, None])
        windows = _tiling(g, region)
        if region.windows and not windows:
            region.why = region.walk_why = f"sliced across its channels ({g.label(region.windows[0][0])})"
        path = region
        for window in windows or [None]:  # each window of a split layer is pruned on its own
            if window is not None:
                window = (*window[:3], path)
                region = _walked(g, k, found, np.arange(window[2])[:, None], window)
            # a reshape split the channels: whole groups of them (heads) instead, each way that gets through
            grouped = [r for r in (_walked(g, k, found, units, window) for units in _coarser(region.splits))
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
    return Plan(groups, skipped)


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


def _walked(g: Graph, k: int, producer: Producer, units: np.ndarray, window=None) -> Region:
    """The region of layer *k*'s output, pruned by *units*: [n, m], the m output channels of each of n units
    (a channel each, or an attention head's outputs in each of Q, K and V). With a *window* (a SLICE
    of the channels, its first channel, its count), the units count from the window's start and the
    walk starts at the SLICE's output."""
    region = Region(k, len(units), segments=producer.groups)
    out = int(g.ops[k].outputs[0])
    start, offset = out, 0
    region.edits.append((k, producer.weight, producer.axis, units))
    if producer.bias is not None:
        region.edits.append((k, producer.bias, 0, units))
    if window is not None:  # what the walk of all channels met before the SLICEs, for this window's channels
        op, offset, _, path = window
        start = int(g.ops[op].outputs[0])
        region.edits = [(reader, position, axis, units + offset) for reader, position, axis, _ in path.edits]
        region.tensors = {t: (axis, units + offset) for t, (axis, _) in path.tensors.items()}
        region.targets = {*path.targets, (op, 2)}
        region.begins.add(op)
    region.weight = (g.tensor(g.input(k, producer.weight)).buffer, producer.axis, offset)
    _walk(g, region, start, len(g.shape(start)) - 1, units)
    region.walk_why = region.why
    return region


def _tiling(g: Graph, region: Region) -> list[tuple[int, int, int, int]]:
    """The windows that SLICEs take of a layer's channels, when the walk met nothing else, they read
    one tensor and nothing else reads it, and together they take each channel once (GPT-2's fused
    Q/K/V projection); else none."""
    if not region.windows or region.why or len({w[3] for w in region.windows}) != 1:
        return []
    sliced = region.windows[0][3]
    if len(region.windows) != len(g.consumers.get(sliced, [])):
        return []
    windows = sorted(region.windows, key=lambda w: w[1])
    ends = [b + n for _, b, n, _ in windows]
    if [b for _, b, _, _ in windows] != [0, *ends[:-1]] or ends[-1] != region.channels:
        return []
    return windows


def _walk(g: Graph, region: Region, start: int, axis: int, positions: np.ndarray) -> None:
    pending = [(start, axis, positions)]
    joined: set[int] = set()
    while region.why is None and (pending or set(region.joins) - joined):
        if not pending:  # every input of a join that carries these channels has been reached
            k = min(set(region.joins) - joined)
            joined.add(k)
            follow = _join(g, k, region.joins[k])
            if isinstance(follow, str):
                region.why = follow
                return
            pending.extend(follow)
            continue
        t, axis, positions = pending.pop()
        if axis is None:  # a statistic (positions: where its channels were), followed on its own terms
            if t not in region.stats:
                region.stats[t] = positions
                for k, position in g.consumers.get(t, []):
                    follow = _from_statistic(g, region, k, position, t, positions)
                    if isinstance(follow, str):
                        region.why = follow
                        return
                    pending.extend(follow)
            continue
        if t in region.tensors:
            seen_axis, seen = region.tensors[t]
            if seen_axis != axis or not np.array_equal(seen, positions):
                region.why = "its channels reach one tensor in two layouts"
            continue
        region.tensors[t] = (axis, positions)
        if t in g.outputs:
            region.why = "its output is a graph output"
            return
        for k, position in g.consumers.get(t, []):
            follow = _follow(g, region, k, position, t, axis, positions)
            if isinstance(follow, str):
                region.why = follow
                return
            pending.extend(follow)


def _follow(g: Graph, region: Region, k: int, position: int, t: int, axis: int, positions: np.ndarray):
    """What op *k* makes of the channels it reads at input *position*: tensors to follow on, or why not."""
    kind, op = g.kinds[k], g.ops[k]
    rank = len(g.shape(t))
    outputs = [int(o) for o in op.outputs]
    plain_last = axis == rank - 1 and positions.shape[1] == 1
    if kind in UNARY or (kind in POOLS and plain_last):
        return [(outputs[0], axis, positions)]
    if kind in ("CONV_2D", "FULLY_CONNECTED") and position == 0:
        if g.const(g.input(k, 1)) is None:
            return f"read by {g.label(k)} as its input, with a computed weight"
        if not g.float_weight(g.input(k, 1)):
            return f"read by {g.label(k)}, whose weight is not float32"
        if axis != rank - 1 or (kind == "CONV_2D" and not plain_last):
            return f"read by {g.label(k)} along another axis"
        if g.shape(g.input(k, 1))[-1] != g.shape(t)[-1]:
            why = _grouped_read(g, region, k, t, positions)
            if why:
                return why
        region.edits.append((k, 1, 3 if kind == "CONV_2D" else 1, positions))
        return []
    if kind == "DEPTHWISE_CONV_2D" and position == 0 and plain_last:
        if op.builtinOptions.depthMultiplier != 1 or not g.float_weight(g.input(k, 1)):
            return f"feeds {g.label(k)} with a depth multiplier or a quantized weight"
        region.edits.append((k, 1, 3, positions))
        if g.const(g.input(k, 2)) is not None:
            region.edits.append((k, 2, 0, positions))
        return [(outputs[0], axis, positions)]
    if kind in BINARY:
        return _binary(g, region, k, position, t, axis, positions)
    if kind in REDUCERS and position == 0:
        axes = g.const(g.input(k, 1))
        if axes is None:
            return f"feeds {g.label(k)} over axes it computes"
        reduced = {int(a) % rank for a in np.ravel(axes)}
        if kind == "MEAN" and {a for a in reduced if g.shape(t)[a] != 1} == {axis} and axis == rank - 1:
            # a mean over the channels, one value per token (a LayerNorm written out): what reads it takes it
            # as the same value for every channel. From the channels that stay it is not the same number —
            # as onnx-prune-channels does with LayerNormalization, what recovery trains for.
            return []
        if kind == "MEAN" and axis in reduced and positions.shape[1] == 1 and \
                np.array_equal(np.sort(positions[:, 0]), np.arange(g.shape(t)[axis])):
            # a mean over the channels and other axes together, one value per sample (a GroupNorm of
            # one group written out): followed as a statistic until it is broadcast back to the channels
            return [(outputs[0], None, (axis, positions))]
        if axis in reduced:
            return f"reduced over its channels ({g.label(k)})"
        keep = op.builtinOptions is not None and op.builtinOptions.keepDims
        return [(outputs[0], axis if keep else axis - sum(a < axis for a in reduced), positions)]
    if kind in PADS and position == 0:
        pads = g.const(g.input(k, 1))
        if pads is None or np.any(pads[axis] != 0):
            return f"padded along its channels ({g.label(k)})"
        return [(outputs[0], axis, positions)]
    if kind == "TRANSPOSE" and position == 0:
        perm = g.const(g.input(k, 1))
        if perm is None:
            return f"feeds {g.label(k)} with a permutation it computes"
        return [(outputs[0], [int(p) % rank for p in np.ravel(perm)].index(axis), positions)]
    if kind in SHAPE_ONLY and position == 0:
        return _reshaped(g, region, k, t, axis, positions)
    if kind == "SLICE" and position == 0:
        begin, size = g.const(g.input(k, 1)), g.const(g.input(k, 2))
        if begin is None or size is None:
            return f"feeds {g.label(k)} with bounds it computes"
        if begin[axis] != 0 or size[axis] not in (-1, g.shape(t)[axis]):
            plain = np.arange(region.channels)[:, None]
            if axis == rank - 1 and size[axis] > 0 and not region.begins and \
                    np.array_equal(region.edits[0][3], plain) and np.array_equal(positions, plain):
                region.windows.append((k, int(begin[axis]), int(size[axis]), t))  # a window of the layer's channels
                return []
            return f"sliced across its channels ({g.label(k)})"
        region.targets.add((k, 2))
        return [(outputs[0], axis, positions)]
    if kind == "BROADCAST_TO" and position == 0:
        # repeated along other axes (Llama's repeat_kv, each K/V head for its group of query heads)
        out_shape = g.shape(outputs[0])
        out_axis = len(out_shape) - (rank - axis)
        if out_shape[out_axis] != g.shape(t)[axis] or g.const(g.input(k, 1)) is None:
            return f"broadcast across its channels ({g.label(k)})"
        region.targets.add((k, 1))
        return [(outputs[0], out_axis, positions)]
    if kind == "SOFTMAX":
        return f"a softmax across its channels ({g.label(k)})" if axis == rank - 1 else [(outputs[0], axis, positions)]
    if kind == "BATCH_MATMUL":
        # a product per head (attention's Q·Kᵀ, weights·V): the channels must be a batch axis of both operands
        if axis >= rank - 2:
            return f"multiplied along its channels ({g.label(k)})"
        return _binary(g, region, k, position, t, axis, positions)
    if kind == "CONCATENATION":
        if op.builtinOptions.axis % rank != axis:
            # joined along another axis (rotary embedding's halves): every part must carry the same
            # channels; a constant part (ViT's class token before the patches) loses them with the layer
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
            return [(outputs[0], axis, positions)]
        region.joins.setdefault(k, {})[position] = (t, axis, positions)
        return []
    if kind == "STRIDED_SLICE" and position == 0:
        return _strided(g, region, k, t, axis, positions)
    return f"feeds {g.label(k)}"


def _from_statistic(g: Graph, region: Region, k: int, position: int, t: int, where: tuple[int, np.ndarray]):
    """What op *k* makes of a statistic of the channels (a GroupNorm's mean or variance, the same for
    every channel): arithmetic with constants or other statistics keeps it one; a BROADCAST_TO back to
    the channel count at the axis they had gives the channels again (its target follows the pruning);
    arithmetic with the channels themselves is theirs to follow."""
    kind, outputs = g.kinds[k], [int(o) for o in g.ops[k].outputs]
    if kind in UNARY or (kind == "RESHAPE" and int(np.prod(g.shape(outputs[0]))) == 1):
        return [(outputs[0], None, where)]
    if kind in BINARY:
        other = g.input(k, 1 - position)
        value = g.const(other)
        if other in region.stats or (value is not None and value.size == 1):
            return [(outputs[0], None, where)]
        axis, positions = where
        if value is not None and value.ndim == len(g.shape(outputs[0])) > axis and \
                value.shape[axis] == len(positions) and value.size == len(positions):
            # times the norm's scale, one per channel where the channels were: the channels again
            region.edits.append((k, 1 - position, axis, positions))
            return [(outputs[0], axis, positions)]
        return []  # (a product with the channels: that operand's walk goes on from there)
    if kind == "BROADCAST_TO" and position == 0 and g.const(g.input(k, 1)) is not None:
        axis, positions = where
        shape = g.shape(outputs[0])
        if axis < len(shape) and shape[axis] == len(positions) and \
                all(d == 1 for i, d in enumerate(shape) if i != axis):
            region.targets.add((k, 1))
            return [(outputs[0], axis, positions)]
    return f"a statistic of its channels feeds {g.label(k)}"


def _join(g: Graph, k: int, parts: dict[int, tuple[int, int, np.ndarray]]):
    """A CONCATENATION along the channels: each input that carries them puts them at its offset. Several
    inputs carrying the same channels (Swin's patch merging joins four strided views of one map)
    give each channel a place in each: unit u's positions are its positions in every such part."""
    inputs = [int(i) for i in g.ops[k].inputs]
    (t, axis, positions), *others = parts.values()
    if any(other_axis != axis or not np.array_equal(other, positions) for _, other_axis, other in others):
        return f"{g.label(k)} joins its channels in two layouts"
    places = [positions + sum(g.shape(i)[axis] for i in inputs[:position]) for position in sorted(parts)]
    return [(int(g.ops[k].outputs[0]), axis, np.concatenate(places, axis=1))]


def _strided(g: Graph, region: Region, k: int, t: int, axis: int, positions: np.ndarray):
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


def _grouped_read(g: Graph, region: Region, k: int, t: int, positions: np.ndarray) -> str | None:
    """A grouped CONV_2D (ResNeXt's 3x3s) reading the channels as they are: each of its groups reads
    its own equal run of them, so each run must lose as many (``Region.segments``) for every group
    to keep a block of one size."""
    width, per_group = g.shape(t)[-1], g.shape(g.input(k, 1))[-1]
    if width % per_group or positions.shape[1] != 1 or not np.array_equal(positions[:, 0], np.arange(width)):
        return f"read by {g.label(k)} in groups that do not line up with its channels"
    if per_group < 2:
        return f"read by {g.label(k)} in groups of one channel"
    region.segments = math.lcm(region.segments, width // per_group)
    return None


def _binary(g: Graph, region: Region, k: int, position: int, t: int, axis: int, positions: np.ndarray):
    other = g.input(k, 1 - position)
    rank, out = len(g.shape(t)), int(g.ops[k].outputs[0])
    from_end = rank - axis  # broadcasting lines axes up from the end
    out_axis = len(g.shape(out)) - from_end
    value = g.const(other)
    along = len(g.shape(other)) - from_end
    if value is None and (along < 0 or g.shape(other)[along] == 1):
        return [(out, out_axis, positions)]  # one value for every channel (a per-token statistic)
    if value is None:
        scale = _norm_scale(g, other, along, g.shape(t)[axis])
        if scale is not None:
            # a LayerNorm's scale as TensorFlow's converter writes it, rsqrt(variance + eps) * gamma: its
            # channels are gamma's, which loses them; the scale is followed on as these channels
            region.edits.append((*scale, positions))
            return [(out, out_axis, positions), (other, along, positions)]
        # another tensor: it must carry the same channels, from this layer (x * sigmoid(x)) or one tied to it
        region.meets.append((other, len(g.shape(other)) - from_end, positions, g.label(k)))
        return [(out, out_axis, positions)]
    if along >= 0 and value.shape[along] != 1:
        if value.shape[along] != g.shape(t)[axis]:
            return f"{g.label(k)} with a constant that does not broadcast per channel"
        region.edits.append((k, 1 - position, along, positions))
    return [(out, out_axis, positions)]


def _norm_scale(g: Graph, t: int, axis: int, channels: int) -> tuple[int, int, int] | None:
    """(operator, input position, channel axis) of the constant gamma when tensor *t* is a MUL of a
    tensor with one value per token (size 1 along *axis*) and a constant with one value per channel
    along it (every other axis 1): TensorFlow's LayerNorm scale; else None."""
    k = g.made_by.get(t)
    if k is None or g.kinds[k] != "MUL" or t in g.outputs or \
            getattr(g.ops[k].builtinOptions, "fusedActivationFunction", 0):
        return None
    rank = len(g.shape(t))
    for position in (0, 1):
        value, other = g.const(g.input(k, position)), g.input(k, 1 - position)
        if value is None or g.const(other) is not None:
            continue
        const_axis, other_axis = value.ndim - (rank - axis), len(g.shape(other)) - (rank - axis)
        if const_axis >= 0 and value.shape[const_axis] == channels == value.size and \
                (other_axis < 0 or g.shape(other)[other_axis] == 1):
            return k, position, const_axis
    return None


def _reshaped(g: Graph, region: Region, k: int, t: int, axis: int, positions: np.ndarray):
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
    begins: set[int] = set()
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
            begins |= region.begins
            if g.kinds[region.layer] == "DEPTHWISE_CONV_2D":
                g.ops[region.layer].builtinOptions.depthMultiplier = keep
    _cut(g, removals, {k: _conv_groups(g, k) for k, kind in enumerate(g.kinds) if kind == "CONV_2D"})
    for k in begins:  # a window of a layer's channels starts earlier by what was removed before it
        t, axis = g.input(k, 0), len(g.shape(g.input(k, 0))) - 1
        begin = g.const(_own(g, k, 1)).copy()
        begin[axis] -= sum(i < begin[axis] for i in shrink.get(t, {}).get(axis, ()))
        _store(g, g.input(k, 1), begin)
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
                _store(g, t, array)
            continue
        for k, position in pairs:
            t = _own(g, k, position)
            _store(g, t, _without(g.const(t), removals[(k, position)], groups.get(k, 1) if position == 1 else 1))


def _conv_groups(g: Graph, k: int) -> int:
    """How many groups CONV_2D *k* convolves its input in (1 unless its filter reads fewer channels)."""
    inputs, filters = g.shape(g.input(k, 0)), g.shape(g.input(k, 1))
    return inputs[-1] // filters[-1] if inputs and filters and filters[-1] else 1


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
    t = _own(g, k, position)
    target = g.const(t)
    if target is not None and target.ndim == 1:
        target = target.copy()
        for entry, n in fewer.items():
            if target[entry] > 0:
                target[entry] -= n
        _store(g, t, target)


def _own(g: Graph, k: int, position: int) -> int:
    """The tensor op *k* reads at *position*, copied (tensor and buffer) first when anything else reads it."""
    from ai_edge_litert import schema_py_generated as schema
    import copy

    t = g.input(k, position)
    if t < 0 or (len(g.consumers.get(t, [])) <= 1 and g.buffer_uses[g.tensor(t).buffer] <= 1):
        return t
    tensor = copy.deepcopy(g.tensor(t))
    if tensor.name:  # (litert-quantizer wants every tensor name once)
        tensor.name += b";op%d" % k
    buffer = schema.BufferT()
    buffer.data = np.array(g.tree.buffers[tensor.buffer].data, np.uint8)
    g.tree.buffers.append(buffer)
    tensor.buffer = len(g.tree.buffers) - 1
    g.graph.tensors.append(tensor)
    new = len(g.graph.tensors) - 1
    g.ops[k].inputs[position] = new
    g.consumers[t].remove((k, position))
    g.consumers[new] = [(k, position)]
    g.buffer_uses[tensor.buffer] = 1
    return new


def _store(g: Graph, t: int, array: np.ndarray) -> None:
    tensor = g.tensor(t)
    g.tree.buffers[tensor.buffer].data = np.frombuffer(np.ascontiguousarray(array).tobytes(), np.uint8).copy()
    tensor.shape = np.array(array.shape, np.int32)
    if tensor.shapeSignature is not None and len(tensor.shapeSignature):
        tensor.shapeSignature = np.array(array.shape, np.int32)
