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
            sort_topologically(converted.graph)  # (the converter puts the Casts it adds for the inputs last)
            onnx.save(converted, str(out))
            crash = session_crash(out)
            if crash:
                import onnxruntime

                raise CompressionError(f"ONNX Runtime {onnxruntime.__version__} crashes ({crash}) creating a CPU "
                                       f"session for the float16 model, so it is not kept; keeping some ops in "
                                       f"float32 (exclude_op_types=..., exclude=...) may avoid it")
        return ModelFile(out, "onnx")
