"""The float parameters a quantizer leaves behind, stored as 8-bit too; or every weight.

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

``onnx-weight-only`` stores every float weight of a float model the same way, a layer's with a
scale per output channel: int8's file size without int8 compute (int8-weights), for the models
and CPUs where int8 compute is slower than float or loses too much.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from device_agent.errors import NotApplicable
from host_tools.compress.model import ModelFile
from host_tools.compress.onnx.boundary import consumers, default_opset, output_path, quantized_already, subgraph_reads
from host_tools.compress.passes import Pass, PassConfig, failing_as, register

# Inputs some runtimes want to see as constants when the session is built (shapes, scales,
# pads, bounds), and the quantization parameters themselves: left as they are.
_KEEP_CONSUMERS = {"DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear", "Resize", "Upsample", "Pad",
                   "Clip", "ConstantOfShape", "Reshape", "Expand", "Tile", "Slice", "TopK", "Range"}
MIN_ELEMENTS = 128
_MIN_HELP = "smallest tensor converted (each adds three nodes and two constants, about 200 bytes)"


@register
class OnnxInt8Params(Pass):
    name = "onnx-int8-params"
    formats = ("onnx",)
    summary = "float parameters left by a quantizer (biases, norms, position tables) stored as 8-bit"
    requires = ("onnx",)

    @dataclass(frozen=True)
    class Config(PassConfig):
        min_elements: int = field(default=MIN_ELEMENTS, metadata={"help": _MIN_HELP})

    def run(self, model, config, workdir):
        return _stored(self.name, model, workdir, "params8", config.min_elements, per_channel=False,
                       none="float parameter", where=" outside quantized ops")  # (run after quantizing)


@register
class OnnxWeightOnly(OnnxInt8Params):
    """Every float weight stored as 8-bit, the compute left in float: the size of int8 at the float
    model's speed, with no calibration data, where int8 compute is slow (ONNX Runtime's dynamically
    quantized convolutions, a CPU without int8 dot products) or loses too much."""

    name = "onnx-weight-only"
    summary = "int8 weights only (8-bit storage, a scale per output channel), float compute at float speed"

    @dataclass(frozen=True)
    class Config(OnnxInt8Params.Config):
        per_channel: bool = field(default=True, metadata={
            "help": "one scale per output channel of a layer's weights (Conv, ConvTranspose, Gemm, MatMul, LSTM, "
                    "GRU, RNN; an embedding table's per column); else one per tensor"})

    def run(self, model, config, workdir):
        return _stored(self.name, model, workdir, "weights8", config.min_elements, per_channel=config.per_channel,
                       none="float weight", where=None)


def _stored(name: str, model: ModelFile, workdir, stem: str, min_elements: int, *, per_channel: bool, none: str,
            where: str | None) -> ModelFile:
    """*model* with its float tensors of *min_elements* or more stored as 8-bit. Where there are none,
    the reason names *none* and *where* they were looked for (None: anywhere, and whether the model
    is quantized already)."""
    import onnx

    out = output_path(workdir, model, stem)
    with failing_as(name, model):
        proto = onnx.load(str(model.path))
        opset = default_opset(proto)
        if opset < 7:
            raise NotApplicable(f"{model.path.name} has opset {opset}; Sub and Mul broadcast from opset 7")
        if store_params_as_uint8(proto, min_elements, per_channel=per_channel) == 0:
            raise NotApplicable(f"{model.path.name} has no {none} of {min_elements} elements or more"
                                + (where if where is not None else quantized_already(proto.graph)))
        onnx.save(proto, str(out))
    return ModelFile(out, "onnx")


def store_params_as_uint8(proto, min_elements: int, read_by: frozenset[str] | None = None, *,
                          per_channel: bool = False) -> int:
    """Rewrite *proto* (opset 7 or newer) in place; returns how many tensors were converted. With
    *read_by*, only tensors that nodes of those op types alone read; with *per_channel*, a layer
    weight gets a scale and zero point per output channel (_output_axis)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    readers = consumers(graph)
    # (what an If's, Loop's or Scan's subgraph reads stays as it is: an outer initializer there)
    pinned = {v.name for v in graph.input} | {v.name for v in graph.output} | subgraph_reads(graph)
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
        axis = _output_axis(init.name, readers[init.name], values.ndim) if per_channel else None
        q, scale, zero = _as_uint8(values, axis)
        stored = init.name + "_u8"
        keep += [numpy_helper.from_array(q, stored), numpy_helper.from_array(scale, stored + "_scale"),
                 numpy_helper.from_array(zero, stored + "_zero")]
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


def _as_uint8(values: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """*values* as uint8, with the float32 scale and zero point that give them back as (q - zero) *
    scale: one for the tensor (scalars), or one per slice along *axis* (shaped to broadcast). Each
    range includes 0, so zeros (pruned weights) stay exactly 0."""
    over = None if axis is None else tuple(i for i in range(values.ndim) if i != axis)
    lo = np.minimum(values.min(axis=over, keepdims=axis is not None), 0).astype(np.float64)
    hi = np.maximum(values.max(axis=over, keepdims=axis is not None), 0).astype(np.float64)
    scale = np.where(hi > lo, (hi - lo) / 255, 1.0).astype(np.float32)
    zero = np.round(-lo / scale).astype(np.float32)
    q = np.clip(np.round(values / scale) + zero, 0, 255).astype(np.uint8)
    return q, scale, zero


def _output_axis(name: str, readers, rank: int) -> int | None:
    """The axis of *name*'s output channels where every node reading it is a layer reading it as its
    weight and they agree (an embedding table's: its columns); else None."""
    if rank < 2:
        return None
    axes = set()
    for node in readers:
        weight = len(node.input) > 1 and node.input[1] == name
        if node.op_type == "Conv" and weight:
            axes.add(0)
        elif node.op_type == "ConvTranspose" and weight:  # [in, out / group, ...]
            axes.add(1)
        elif node.op_type == "MatMul" and weight:
            axes.add(rank - 1)
        elif node.op_type == "Gemm" and weight:
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            axes.add(0 if trans_b else 1)
        elif node.op_type in ("LSTM", "GRU", "RNN") and name in node.input[1:3]:  # [directions, gates x hidden, ...]
            axes.add(1)
        elif node.op_type == "Gather" and node.input[0] == name:
            axes.add(rank - 1)
        else:
            return None
    return axes.pop() if len(axes) == 1 else None
