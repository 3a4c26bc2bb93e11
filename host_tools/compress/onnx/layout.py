"""What a channel-pruning region is made of (see ``regions``): where a tensor keeps a layer's
channels (``Layout``), the layers that read them and the per-channel constants on the way
(``Reader``, ``Param``), the region itself, the graph view the walk reads, the op families it
knows, and how a node's attributes and constants are read."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

# Elementwise ops of one data input (any other inputs are constants, e.g. Clip's bounds).
UNARY_OPS = {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "Elu", "HardSigmoid", "HardSwish", "Selu", "Softplus",
             "Softsign", "Identity", "Dropout", "Erf", "Exp", "Neg", "Abs", "Sqrt", "Reciprocal", "Gelu", "Mish",
             "Celu", "ThresholdedRelu", "Cast"}
BINARY_OPS = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"}
POOL_OPS = {"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool"}
REDUCE_OPS = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL2"}
WEIGHTED_OPS = {"Conv", "Gemm", "MatMul"}


@dataclass(frozen=True)
class Layout:
    """Where a region tensor keeps the layer's channels: axis 1 of a feature map ("map"), or the
    last axis ("vec"), in blocks of *block* features after a Flatten (or of a head's features
    after heads are merged); after a Concat, at *offsets* of a tensor *width* channels wide (None:
    the tensor is the layer's channels alone). Attention heads ("heads", see ``heads``) sit on
    axis *at*, *block* consecutive heads per unit (one, but for grouped-query attention)."""
    kind: str
    rank: int | None
    block: int = 1
    offsets: tuple[int, ...] = (0,)
    width: int | None = None
    at: int | None = None


@dataclass(frozen=True)
class Reader:
    """A weighted layer that reads a pruned layer's channels as its input channels."""
    node: str
    weight: str
    axis: int  # the weight's input-channel axis
    block: int = 1  # flattened features per channel at this reader (H*W after a Flatten)
    offsets: tuple[int, ...] = (0,)  # where the channels start among its inputs (after a Concat)


@dataclass
class Graph:
    nodes: list
    consts: dict  # initializer name -> TensorProto
    shapes: dict[str, list]
    uses: Counter
    outputs: set[str]
    readers: dict[str, list]  # tensor -> the nodes that read it
    made_by: dict  # tensor -> the node that writes it
    names: dict[str, list] = field(default_factory=dict)  # tensor -> its symbolic dimensions' names, else None
    run_sizes: Callable[[str], list] = lambda name: []  # tensor -> its shapes in made-up runs (static_shapes)
    run_values: Callable[[str], list] = lambda name: []  # small integer tensor -> its values in those runs

    def only_reader(self, tensor: str, op: str):
        """The node that alone reads *tensor* (not a graph output), if it is an *op*; else None."""
        readers = self.readers.get(tensor, [])
        return readers[0] if len(readers) == 1 and readers[0].op_type == op and tensor not in self.outputs else None

    def in_every_run(self, name: str, axis: int, size: int) -> bool:
        """Whether tensor *name* had *size* on *axis* in every made-up run of the model (and there were runs)."""
        runs = self.run_sizes(name)
        return bool(runs) and all(len(run) > axis % max(len(run), 1) and run[axis] == size for run in runs)


@dataclass(frozen=True)
class Param:
    """A constant with one entry per channel on *axis* (in blocks of *block*, at *offsets*)."""
    axis: int
    offsets: tuple[int, ...] = (0,)
    block: int = 1


@dataclass
class Region:
    """*channels*: the layer's pruning units — its output channels, or its attention heads once a
    Reshape splits them into heads; then each unit is *out_block* outputs at each of *out_offsets*
    (in units: sections, like Q, K and V, of one fused layer). A region of a *window* of the
    layer's channels (one part of a Split of them) has its start as its offset. *windows*: the
    (start, size) parts of a Split the walk found dividing all of the layer's channels."""
    channels: int
    tensors: dict[str, Layout] = field(default_factory=dict)
    params: dict[str, Param] = field(default_factory=dict)
    readers: dict[str, Reader] = field(default_factory=dict)  # by node name
    depthwise: set[str] = field(default_factory=set)  # depthwise convs in it: their group = their channels
    meets: list[tuple[str, Layout, str]] = field(default_factory=list)  # (other tensor, its layout here, op)
    # (shape constant, entry, per unit[, where a window of the layer starts in the tensor reshaped])
    reshapes: list[tuple] = field(default_factory=list)
    # (tensor, region tensor): a Reshape of the first takes the second's channel count, read at run time
    same_channels: list[tuple[str, str]] = field(default_factory=list)
    out_offsets: tuple[int, ...] = (0,)
    out_block: int = 1
    windows: list[tuple[int, int]] | None = None
    # heads taken this many at a time as one unit: a query layer under grouped-query attention,
    # which can only lose the query heads of a K/V head together
    coarse: int = 1
    # the channels fall into this many equal runs that must each lose as many: a grouped Conv's
    # groups, which it reads or writes (each group's weight stays a block of the same size)
    segments: int = 1
    why: str | None = None  # why its channels must stay, if they must

    def cut(self, name: str, param: Param) -> bool:
        """Record that constant *name* loses the region's units at *param*'s places; False when the
        region cuts it already at other places (a constant shared by nodes the channels reach at
        other offsets: one cut cannot serve both)."""
        return self.params.setdefault(name, param) == param


def is_scalar(init) -> bool:
    return int(np.prod(list(init.dims) or [1])) == 1


def const_array(init) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(init)


def attr(node, name: str, default):
    """A node's attribute *name* as its value (int, float, string, list…), else *default*."""
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def ints(node, name: str) -> list[int]:
    return list(next((a.ints for a in node.attribute if a.name == name), []))


def axes_of(node, consts) -> list[int]:
    """The axes of a Squeeze, Unsqueeze or reduction: its second input where that is a constant
    (opset 13 and later), else its ``axes`` attribute (empty: none given)."""
    given = node.input[1] if len(node.input) > 1 else ""
    return [int(a) for a in const_array(consts[given]).ravel()] if given in consts else ints(node, "axes")
