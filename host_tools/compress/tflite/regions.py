"""A prunable layer's *region*: what is computed from its output channels, channel by channel, up to
the layers that read them (see ``channels`` for how regions become pruning groups).

TFLite keeps channels on the last axis (NHWC). A prunable layer (``prunable``) is a CONV_2D or
FULLY_CONNECTED with a constant float32 weight, a DEPTHWISE_CONV_2D over one input channel (how
converters write a first convolution over a grey image), or an embedding (a GATHER or
EMBEDDING_LOOKUP of rows of a constant table). The walk (``walked``) follows its channels through
what treats them one by one — activations, pooling, a per-channel constant added or multiplied, a
depthwise convolution, a MEAN over other axes (or over the channels: a LayerNorm's statistics,
computed from fewer channels, as recovery then trains for), padding of other axes, and reshapes and
transposes that keep each channel's values on one axis (the flatten before a classifier) — to the
CONV_2D and FULLY_CONNECTED layers that read them, whose matching input channels (or blocks of
flattened features) go too. On the way it records every tensor's channel axis and where each unit
sits along it, the constants that lose entries, the shape constants that follow, and where the
channels meet another operand (a residual ADD, a gate's MUL), which only another layer's region
can explain; the ops that move channels without changing them are in ``moves``. Anything else stops
the walk with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from host_tools.compress.tflite import moves
from host_tools.compress.tflite.graph import Graph

UNARY = {"RELU", "RELU6", "RELU_N1_TO_1", "RELU_0_TO_1", "LOGISTIC", "TANH", "GELU", "HARD_SWISH", "LEAKY_RELU",
         "ELU", "ABS", "NEG", "EXP", "SQUARE", "SQRT", "RSQRT", "SIN", "COS", "FLOOR", "CEIL", "ROUND", "SIGN",
         "DEQUANTIZE"}
BINARY = {"ADD", "SUB", "MUL", "DIV", "MAXIMUM", "MINIMUM", "SQUARED_DIFFERENCE", "POW"}
# pooling and resizing of NHWC feature maps: each channel on its own
POOLS = {"MAX_POOL_2D", "AVERAGE_POOL_2D", "L2_POOL_2D", "RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR"}
REDUCERS = {"MEAN", "SUM", "REDUCE_MAX", "REDUCE_MIN", "REDUCE_PROD"}
PADS = {"PAD", "PADV2", "MIRROR_PAD"}
SHAPE_ONLY = {"RESHAPE", "SQUEEZE", "EXPAND_DIMS"}


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


@dataclass(frozen=True)
class Producer:
    """Where a prunable layer keeps its weight, and which of the weight's axes are its output channels."""
    weight: int  # input position
    axis: int
    channels: int
    bias: int | None  # input position
    groups: int = 1  # a grouped CONV_2D's groups


def prunable(g: Graph, k: int) -> Producer | None:
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
        groups = g.conv_groups(k)
        return Producer(1, 0, shape[0], bias, groups) if inputs[-1] % shape[-1] == 0 and shape[0] % groups == 0 \
            else None
    if not inputs or inputs[-1] != shape[-1]:
        return None
    return Producer(1, 0, shape[0], bias) if kind == "CONV_2D" or len(shape) == 2 else None


def walked(g: Graph, k: int, producer: Producer, units: np.ndarray, window=None) -> Region:
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


def tiling(g: Graph, region: Region) -> list[tuple[int, int, int, int]]:
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
            follow = moves.join(g, k, region.joins[k])
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
    kind, rank, out = g.kinds[k], len(g.shape(t)), int(g.ops[k].outputs[0])
    if kind in UNARY or (kind in POOLS and axis == rank - 1):
        return [(out, axis, positions)]
    if kind in BINARY:
        return _binary(g, region, k, position, t, axis, positions)
    if kind == "SOFTMAX":
        return f"a softmax across its channels ({g.label(k)})" if axis == rank - 1 else [(out, axis, positions)]
    if kind == "BATCH_MATMUL":
        # a product per head (attention's Q·Kᵀ, weights·V): the channels must be a batch axis of both operands
        if axis >= rank - 2:
            return f"multiplied along its channels ({g.label(k)})"
        return _binary(g, region, k, position, t, axis, positions)
    if kind == "CONCATENATION":
        return moves.concatenated(g, region, k, position, t, axis, positions)
    if position == 0 and kind in FIRST_INPUT:
        return FIRST_INPUT[kind](g, region, k, t, axis, positions)
    return f"feeds {g.label(k)}"


def _read(g: Graph, region: Region, k: int, t: int, axis: int, positions: np.ndarray):
    """A CONV_2D or FULLY_CONNECTED reading the channels as its input: the end of the walk there, its
    weight losing the matching input channels."""
    kind, rank = g.kinds[k], len(g.shape(t))
    if g.const(g.input(k, 1)) is None:
        return f"read by {g.label(k)} as its input, with a computed weight"
    if not g.float_weight(g.input(k, 1)):
        return f"read by {g.label(k)}, whose weight is not float32"
    if axis != rank - 1:
        return f"read by {g.label(k)} along another axis"
    if g.shape(g.input(k, 1))[-1] != g.shape(t)[-1]:
        why = _grouped_read(g, region, k, t, positions)
        if why:
            return why
    region.edits.append((k, 1, 3 if kind == "CONV_2D" else 1, positions))
    return []


def _depthwise(g: Graph, region: Region, k: int, t: int, axis: int, positions: np.ndarray):
    if axis != len(g.shape(t)) - 1:
        return f"feeds {g.label(k)}"
    if g.ops[k].builtinOptions.depthMultiplier != 1 or not g.float_weight(g.input(k, 1)):
        return f"feeds {g.label(k)} with a depth multiplier or a quantized weight"
    region.edits.append((k, 1, 3, positions))
    if g.const(g.input(k, 2)) is not None:
        region.edits.append((k, 2, 0, positions))
    return [(int(g.ops[k].outputs[0]), axis, positions)]


def _reduced(g: Graph, region: Region, k: int, t: int, axis: int, positions: np.ndarray):
    kind, op, rank, out = g.kinds[k], g.ops[k], len(g.shape(t)), int(g.ops[k].outputs[0])
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
        return [(out, None, (axis, positions))]
    if axis in reduced:
        return f"reduced over its channels ({g.label(k)})"
    keep = op.builtinOptions is not None and op.builtinOptions.keepDims
    return [(out, axis if keep else axis - sum(a < axis for a in reduced), positions)]


# ops whose first input takes the channels, and what each makes of them there
FIRST_INPUT = {"CONV_2D": _read, "FULLY_CONNECTED": _read, "DEPTHWISE_CONV_2D": _depthwise,
               **dict.fromkeys(REDUCERS, _reduced), **dict.fromkeys(PADS, moves.padded),
               "TRANSPOSE": moves.transposed, **dict.fromkeys(SHAPE_ONLY, moves.reshaped), "SLICE": moves.sliced,
               "STRIDED_SLICE": moves.strided, "BROADCAST_TO": moves.broadcast}


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
