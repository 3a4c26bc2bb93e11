"""A TFLite model's first subgraph as the compression passes read and edit it: its operators and
their kinds, who reads each tensor, constants as NumPy arrays, and the two edits the passes make to
the object tree (``flatbuffer.read``) — a constant of one operator's own, and new contents for a
constant, its recorded shape following."""

from __future__ import annotations

import copy
from collections import Counter

import numpy as np

from host_tools.compress.tflite import flatbuffer

FLOAT32 = 0
# TFLite TensorType -> NumPy dtype, for the constants read here
DTYPES = {0: np.float32, 1: np.float16, 2: np.int32, 3: np.uint8, 4: np.int64, 6: np.bool_, 7: np.int16, 9: np.int8,
          10: np.float64}


class Graph:
    """A subgraph of a TFLite object tree (the first, the model's own, unless told), with what the
    passes ask of it."""

    def __init__(self, tree, index: int = 0) -> None:
        self.tree = tree
        self.graph = tree.subgraphs[index]
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

    def conv_groups(self, k: int) -> int:
        """How many groups CONV_2D *k* convolves its input in (1 unless its filter reads fewer channels)."""
        inputs, filters = self.shape(self.input(k, 0)), self.shape(self.input(k, 1))
        return inputs[-1] // filters[-1] if inputs and filters and filters[-1] else 1

    def own(self, k: int, position: int) -> int:
        """The tensor op *k* reads at *position*, copied (tensor and buffer) first when anything else reads it."""
        from ai_edge_litert import schema_py_generated as schema

        t = self.input(k, position)
        if t < 0 or (len(self.consumers.get(t, [])) <= 1 and self.buffer_uses[self.tensor(t).buffer] <= 1):
            return t
        tensor = copy.deepcopy(self.tensor(t))
        if tensor.name:  # (litert-quantizer wants every tensor name once)
            tensor.name += b";op%d" % k
        buffer = schema.BufferT()
        buffer.data = np.array(self.tree.buffers[tensor.buffer].data, np.uint8)
        self.tree.buffers.append(buffer)
        tensor.buffer = len(self.tree.buffers) - 1
        self.graph.tensors.append(tensor)
        new = len(self.graph.tensors) - 1
        self.ops[k].inputs[position] = new
        self.consumers[t].remove((k, position))
        self.consumers[new] = [(k, position)]
        self.buffer_uses[tensor.buffer] = 1
        return new

    def store(self, t: int, array: np.ndarray) -> None:
        tensor = self.tensor(t)
        self.tree.buffers[tensor.buffer].data = np.frombuffer(np.ascontiguousarray(array).tobytes(), np.uint8).copy()
        tensor.shape = np.array(array.shape, np.int32)
        if tensor.shapeSignature is not None and len(tensor.shapeSignature):
            tensor.shapeSignature = np.array(array.shape, np.int32)
