"""The float parameters a quantizer leaves behind, stored as 8-bit too.

ORT's quantizers turn the weights of the ops they quantize (MatMul, Gemm, Conv, ...) into int8,
and leave every other parameter in float: a transformer's position table, LayerNorm scales and
shifts, the biases added after a quantized MatMul, a CNN's biases. On a small model that float
remainder is a sizeable share of the file (13% of the reference transformer's int8 file). This
pass stores each such tensor as uint8 with one scale and zero point, and gives the graph its
float values back with Cast, Sub and Mul (weight-only: compute stays as it was). Those three read
only constants, so ONNX Runtime folds them when it loads the model, and a call costs what the
float model's did. A DequantizeLinear, which says the same in one node, is not folded (ORT keeps
it for its QDQ fusions) and ran on every call: +20 µs, 1.43x, on a 45 µs GRU digit reader.
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
MIN_ELEMENTS = 128


@register
class OnnxInt8Params(Pass):
    name = "onnx-int8-params"
    formats = ("onnx",)
    summary = "float parameters left by a quantizer (biases, norms, position tables) stored as 8-bit"
    requires = ("onnx",)

    @dataclass(frozen=True)
    class Config(PassConfig):
        min_elements: int = field(default=MIN_ELEMENTS, metadata={
            "help": "smallest tensor converted (each adds three nodes and two constants, about 200 bytes)"})

    def run(self, model, config, workdir):
        import onnx

        out = output_path(workdir, model, "params8")
        with failing_as(self.name, model):
            proto = onnx.load(str(model.path))
            opset = default_opset(proto)
            if opset < 7:
                raise NotApplicable(f"{model.path.name} has opset {opset}; Sub and Mul broadcast from opset 7")
            if store_params_as_uint8(proto, config.min_elements) == 0:
                raise NotApplicable(f"{model.path.name} has no float parameter of {config.min_elements} "
                                    "elements or more outside quantized ops")
            onnx.save(proto, str(out))
        return ModelFile(out, "onnx")


def store_params_as_uint8(proto, min_elements: int, read_by: frozenset[str] | None = None) -> int:
    """Rewrite *proto* (opset 7 or newer) in place; returns how many tensors were converted. With
    *read_by*, only tensors that nodes of those op types alone read."""
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
                or int(np.prod(init.dims)) < min_elements or (read_by is not None and not ops <= read_by)):
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
        stored = init.name + "_u8"
        keep += [numpy_helper.from_array(q, stored),
                 numpy_helper.from_array(np.array(scale, np.float32), stored + "_scale"),
                 numpy_helper.from_array(np.array(zero, np.float32), stored + "_zero")]
        new_nodes += [helper.make_node("Cast", [stored], [stored + "_f"], to=TensorProto.FLOAT, name=stored + "_cast"),
                      helper.make_node("Sub", [stored + "_f", stored + "_zero"], [stored + "_c"], name=stored + "_sub"),
                      helper.make_node("Mul", [stored + "_c", stored + "_scale"], [init.name], name=stored + "_mul")]
        converted += 1
    if converted:
        del graph.initializer[:]
        graph.initializer.extend(keep)
        nodes = new_nodes + list(graph.node)
        del graph.node[:]
        graph.node.extend(nodes)
    return converted
