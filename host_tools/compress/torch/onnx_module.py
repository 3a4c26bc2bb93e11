"""An ONNX graph run by PyTorch, with its weights as trainable parameters.

Fine-tuning a pruned ONNX model needs gradients, which ONNX Runtime's inference build does not
give. This module interprets the graph op by op with torch functions; the float initializers
of weighted ops (Conv, Gemm, MatMul, normalisation) become ``nn.Parameter``s, and after
training ``write_back`` puts their values into the same ONNX graph, so the structure the
device runs is exactly the one that was pruned and measured. The ops are torch functions in
``onnx_ops``; ops outside that set are refused by name before any training starts.

A graph whose shapes hold a batch of one (inputs declared [1, …], a flatten to [1, 512]; torch.export
bakes the batch of its example in) runs each sample on its own, vectorised over the training batch
with ``torch.func.vmap``, as ``tflite_module`` does: ``per_sample``, set from the graph's inputs, or
by the caller for a graph that declares a batch axis its shapes do not have.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from device_agent.errors import NotApplicable
from host_tools.compress.onnx.initializers import FLOAT_TYPES, fresh_name, value_names
from host_tools.compress.torch.onnx_ops import OPS

# (Gather: an embedding table; only float initializers become parameters)
TRAINABLE_INPUTS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (1,),
                    "BatchNormalization": (1, 2), "LayerNormalization": (1, 2), "InstanceNormalization": (1, 2),
                    "Add": (0, 1), "Mul": (0, 1), "PRelu": (1,), "Gather": (0,)}


def _attrs(node) -> dict:
    """A node's attributes by name; a string one as str (ONNX stores them as bytes)."""
    from onnx import helper

    values = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return {name: v.decode() if isinstance(v, bytes) else v for name, v in values.items()}


class OnnxModule(nn.Module):
    def __init__(self, proto) -> None:
        super().__init__()
        from onnx import numpy_helper

        self.graph = proto.graph
        unsupported = sorted({n.op_type for n in self.graph.node} - set(OPS))
        if unsupported:
            raise NotApplicable(f"fine-tuning cannot run op(s) {', '.join(unsupported)} in PyTorch")
        trainable = {n.input[i] for n in self.graph.node for i in TRAINABLE_INPUTS.get(n.op_type, ())
                     if i < len(n.input)}
        _fix_apart(proto, trainable)
        self.names: dict[str, str] = {}
        self.params = nn.ParameterDict()
        self.consts: dict[str, torch.Tensor] = {}
        for init in self.graph.initializer:
            value = torch.from_numpy(np.array(numpy_helper.to_array(init)))
            if init.name in trainable and value.is_floating_point() and value.dim() >= 1:
                key = f"p{len(self.params)}"
                self.params[key] = nn.Parameter(value.float())
                self.names[init.name] = key
            else:
                self.consts[init.name] = value
        inputs = [i for i in self.graph.input if i.name not in self.consts and i.name not in self.names]
        self.input_names = [i.name for i in inputs]
        self.output_names = [o.name for o in self.graph.output]
        self.per_sample = bool(inputs) and all(_first_dim(i) == 1 for i in inputs)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """*inputs* are [N, …]; with ``per_sample``, the graph runs each sample as a batch of one, and
        each output is the samples' outputs joined along their first axis, as calls of one sample give."""
        if not self.per_sample:
            return self._run(*inputs)
        batched = [x.unsqueeze(1) for x in inputs]
        try:
            stacked = torch.func.vmap(self._run)(*batched)
        except RuntimeError:  # an op vmap cannot vectorise: one sample after another
            outputs = [self._run(*[x[i] for x in batched]) for i in range(len(batched[0]))]
            stacked = tuple(torch.stack(parts) for parts in zip(*outputs))
        return tuple(o.flatten(0, 1) if o.dim() >= 2 else o for o in stacked)

    def _run(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        env: dict[str, torch.Tensor] = dict(self.consts)
        env.update({name: self.params[key] for name, key in self.names.items()})
        env.update(zip(self.input_names, inputs))
        for node in self.graph.node:
            args = [env[name] if name else None for name in node.input]
            attrs = _attrs(node)
            if node.op_type == "Split":  # split evenly into as many parts as the node has outputs
                attrs.setdefault("num_outputs", len(node.output))
            result = OPS[node.op_type](args, attrs)
            for name, value in zip(node.output, result if isinstance(result, tuple) else (result,)):
                env[name] = value
        return tuple(env[name] for name in self.output_names)

    def write_back(self, proto) -> None:
        from onnx import numpy_helper

        by_name = {i.name: i for i in proto.graph.initializer}
        for name, key in self.names.items():
            original = numpy_helper.to_array(by_name[name])
            value = self.params[key].detach().cpu().numpy().astype(original.dtype)
            by_name[name].CopyFrom(numpy_helper.from_array(value, name))


def _fix_apart(proto, trainable: set[str]) -> None:
    """A constant that trains where one node reads it and stays fixed where another does
    (torch.export stores equal constants once: one BatchNorm's bias and another's running mean,
    both zeros) gets a copy for the fixed reads, in *proto* itself, so training leaves them be."""
    from onnx import numpy_helper

    inits = {i.name: i for i in proto.graph.initializer if i.data_type in FLOAT_TYPES}  # float ones train
    copies: dict[str, str] = {}
    taken = value_names(proto.graph)
    for node in proto.graph.node:
        roles = TRAINABLE_INPUTS.get(node.op_type, ())
        for i, name in enumerate(node.input):
            if name in trainable and name in inits and i not in roles:
                if name not in copies:
                    copies[name] = fresh_name(f"{name}.fixed", taken)
                    proto.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(inits[name]),
                                                                           copies[name]))
                node.input[i] = copies[name]


def _first_dim(value_info) -> int | None:
    dims = value_info.type.tensor_type.shape.dim
    return dims[0].dim_value if dims and dims[0].HasField("dim_value") else None
