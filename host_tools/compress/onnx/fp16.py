"""float16 weights and compute: half the size; fast where the hardware has fp16 (Jetson GPUs),
often slower on CPUs that convert back and forth, which the report shows."""

from __future__ import annotations

from dataclasses import dataclass, field

from device_agent.errors import CompressionError, NotApplicable
from host_tools.compress.model import ModelFile
from host_tools.compress.onnx.boundary import (output_path, quantized_already, quiet_ort_quantizer, session_crash,
                                               sort_topologically, typed_by_ort)
from host_tools.compress.onnx.initializers import drop_initializer_inputs
from host_tools.compress.passes import Pass, PassConfig, failing_as, register


@register
class OnnxFp16(Pass):
    name = "onnx-fp16"
    formats = ("onnx",)
    summary = "float16 weights and compute"
    requires = ("onnx", "onnxruntime")

    @dataclass(frozen=True)
    class Config(PassConfig):
        keep_io_types: bool = field(default=True, metadata={
            "help": "keep float32 inputs and outputs, so callers and health checks need no change"})
        exclude_op_types: tuple[str, ...] = field(default=(), metadata={"help": "op types to keep in float32"})
        exclude: tuple[str, ...] = field(default=(), metadata={"help": "node names to keep in float32"})

    @quiet_ort_quantizer()  # (its converter logs through the root logger too)
    def run(self, model, config, workdir):
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        out = output_path(workdir, model, "fp16")
        with failing_as(self.name, model):
            proto = onnx.load(str(model.path))
            drop_initializer_inputs(proto)  # (IR < 4: weights listed as inputs too would stay float32)
            types = {init.data_type for init in proto.graph.initializer}
            if onnx.TensorProto.FLOAT16 in types and onnx.TensorProto.FLOAT not in types:
                raise NotApplicable(f"{model.path.name} has float16 weights already")
            quantized = quantized_already(proto.graph)
            if quantized:  # (its Quantize/DequantizeLinear nodes would be given float16 scales they cannot take)
                raise NotApplicable(f"{model.path.name} cannot be made float16{quantized}")
            constants = [*proto.graph.initializer, *(a.t for n in proto.graph.node if n.op_type == "Constant"
                                                     for a in n.attribute if a.name == "value")]
            if not any(t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 2 for t in constants):
                ml = sorted({n.op_type for n in proto.graph.node if n.domain == "ai.onnx.ml"})
                raise NotApplicable(f"{model.path.name} has no float32 weight tensor to store as float16"
                                    + (f" (its parameters are attributes of {', '.join(ml[:3])})" if ml else ""))
            if proto.ByteSize() < 2**31 - 2**20:  # (the converter puts Casts where the types say to)
                typed_by_ort(proto)
            converted = convert_float_to_float16(
                proto, keep_io_types=config.keep_io_types,
                op_block_list=list(config.exclude_op_types) or None, node_block_list=list(config.exclude) or None)
            casts_into_subgraphs(converted.graph)
            sort_topologically(converted.graph)  # (the converter puts the Casts it adds for the inputs last)
            onnx.save(converted, str(out))
            crash = session_crash(out)
            if crash:
                import onnxruntime

                raise CompressionError(f"ONNX Runtime {onnxruntime.__version__} crashes ({crash}) creating a CPU "
                                       f"session for the float16 model, so it is not kept; keeping some ops in "
                                       f"float32 (exclude_op_types=..., exclude=...) may avoid it")
        return ModelFile(out, "onnx")


def casts_into_subgraphs(graph) -> int:
    """ONNX Runtime's float16 converter adds every Cast to the main graph, those around an op it
    keeps in float32 inside an If or Loop body too (a NonMaxSuppression in torchvision's
    batched_nms), where the Cast reads a name only that body makes and ONNX Runtime refuses the model.
    Each such Cast goes into the body that makes what it reads, right after the node that makes it.
    Returns how many moved."""
    moved = 0
    while True:
        made = {"", *(i.name for i in graph.initializer), *(v.name for v in graph.input),
                *(name for node in graph.node for name in node.output)}
        stray = next((node for node in graph.node if node.op_type == "Cast" and node.input[0] not in made), None)
        home = stray and _maker(graph, stray.input[0])
        if not home:
            return moved
        body, index = home
        graph.node.remove(stray)
        body.node.insert(index + 1, stray)
        moved += 1


def _maker(graph, name: str):
    """(the subgraph of a node of *graph*, at any depth, whose node *index* makes *name*), or None."""
    for node in graph.node:
        for a in node.attribute:
            for body in ([a.g] if a.type == 5 else list(a.graphs) if a.type == 10 else []):  # GRAPH(S)
                index = next((i for i, inner in enumerate(body.node) if name in inner.output), None)
                found = (body, index) if index is not None else _maker(body, name)
                if found:
                    return found
    return None
