"""The float parameters a quantizer leaves behind, stored as 8-bit too.

ORT's quantizers turn the weights of the ops they quantize (MatMul, Gemm, Conv, ...) into int8,
and leave every other parameter in float: a transformer's position table, LayerNorm scales and
shifts, the biases added after a quantized MatMul, a CNN's biases. On a small model that float
remainder is a sizeable share of the file (13% of the reference transformer's int8 file). This
pass stores each such tensor as uint8 with one scale and zero point, and a DequantizeLinear node
that gives the graph its float values back at run time (weight-only: compute stays as it was).
The error is at most half a step of 1/255 of the tensor's range, which the accuracy guard
measures like any other pass's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from device_agent.errors import NotApplicable
from host_tools.compress.model import ModelFile
from host_tools.compress.onnx.boundary import consumers, default_opset, has_subgraphs, output_path
from host_tools.compress.passes import Pass, PassConfig, failing_as, register

# Inputs some runtimes want to see as constants when the session is built (shapes, scales,
# pads, bounds), and the quantization parameters themselves: left as they are.
_KEEP_CONSUMERS = {"DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear", "Resize", "Upsample", "Pad",
                   "Clip", "ConstantOfShape", "Reshape", "Expand", "Tile", "Slice", "TopK", "Range"}


@register
class OnnxInt8Params(Pass):
    name = "onnx-int8-params"
    formats = ("onnx",)
    summary = "float parameters left by a quantizer (biases, norms, position tables) stored as 8-bit"
    requires = ("onnx",)

    @dataclass(frozen=True)
    class Config(PassConfig):
        min_elements: int = field(default=128, metadata={
            "help": "smallest tensor converted (each adds a DequantizeLinear to every run: at 64, the "
                    "reference transformer's file was 2% smaller and its calls 10% slower)"})

    def run(self, model, config, workdir):
        import onnx

        out = output_path(workdir, model, "params8")
        with failing_as(self.name, model):
            proto = onnx.load(str(model.path))
            opset = default_opset(proto)
            if opset < 10:
                raise NotApplicable(f"{model.path.name} has opset {opset}; DequantizeLinear needs 10 or newer")
            if store_params_as_uint8(proto, config.min_elements) == 0:
                raise NotApplicable(f"{model.path.name} has no float parameter of {config.min_elements} "
                                    "elements or more outside quantized ops")
            onnx.save(proto, str(out))
        return ModelFile(out, "onnx")


def store_params_as_uint8(proto, min_elements: int) -> int:
    """Rewrite *proto* (opset 10 or newer) in place; returns how many tensors were converted."""
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    if has_subgraphs(graph):
        return 0  # subgraphs may read outer initializers; not worth the risk
    readers = consumers(graph)
    pinned = {v.name for v in graph.input} | {v.name for v in graph.output}
    converted, keep, new_nodes = 0, [], []
    for init in graph.initializer:
        ops = {node.op_type for node in readers.get(init.name, ())}
        if (init.data_type != TensorProto.FLOAT or init.name in pinned or not ops or ops & _KEEP_CONSUMERS
                or int(np.prod(init.dims)) < min_elements):
            keep.append(init)
            continue
        values = numpy_helper.to_array(init)
        if not np.isfinite(values).all():
            keep.append(init)
            continue
        lo, hi = min(float(values.min()), 0.0), max(float(values.max()), 0.0)
        scale = (hi - lo) / 255 or 1.0
        zero = int(round(-lo / scale))
        q = np.clip(np.round(values / scale) + zero, 0, 255).astype(np.uint8)
        keep += [numpy_helper.from_array(q, init.name + "_u8"),
                 numpy_helper.from_array(np.array(scale, np.float32), init.name + "_scale"),
                 numpy_helper.from_array(np.array(zero, np.uint8), init.name + "_zero")]
        new_nodes.append(helper.make_node("DequantizeLinear", [init.name + "_u8", init.name + "_scale",
                                                               init.name + "_zero"], [init.name],
                                          name=init.name + "_dequantize"))
        converted += 1
    if converted:
        del graph.initializer[:]
        graph.initializer.extend(keep)
        nodes = new_nodes + list(graph.node)
        del graph.node[:]
        graph.node.extend(nodes)
    return converted
