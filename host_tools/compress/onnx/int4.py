"""int4 weight-only quantization of MatMul weights (blockwise, ORT's MatMulNBits): for
transformer-style models whose size is in their MatMul weights; activations stay float."""

from __future__ import annotations

from dataclasses import dataclass, field

from device_agent.errors import NotApplicable
from host_tools.compress.model import ModelFile
from host_tools.compress.onnx.boundary import output_path, quiet_ort_quantizer, weighted_nodes
from host_tools.compress.passes import Pass, PassConfig, failing_as, register


@register
class OnnxInt4WeightOnly(Pass):
    name = "onnx-int4"
    formats = ("onnx",)
    summary = "int4 weight-only MatMul (blockwise, MatMulNBits)"
    requires = ("onnx", "onnxruntime", "onnx_ir")

    @dataclass(frozen=True)
    class Config(PassConfig):
        block_size: int = field(default=32, metadata={"help": "weights sharing one scale (16, 32, 64, 128…)"})
        symmetric: bool = field(default=True, metadata={"help": "no zero point"})
        accuracy_level: int = field(default=4, metadata={
            "help": "compute type of MatMulNBits: 0 default, 1 fp32, 2 fp16, 3 bf16, 4 int8"})
        exclude: tuple[str, ...] = field(default=(), metadata={"help": "node names to leave in float"})

    def run(self, model, config, workdir):
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quiet_ort_quantizer()
        matmuls = [n for n, _ in weighted_nodes(model.path, ("MatMul",)) if n not in config.exclude]
        if not matmuls:
            raise NotApplicable(f"{model.path.name} has no MatMul with constant weights "
                                f"(int4 weight-only is for MatMul-heavy models such as transformers)")
        out = output_path(workdir, model, "int4")
        with failing_as(self.name, model):
            quantizer = MatMulNBitsQuantizer(onnx.load(str(model.path)), bits=4, block_size=config.block_size,
                                             is_symmetric=config.symmetric, accuracy_level=config.accuracy_level,
                                             nodes_to_exclude=list(config.exclude))
            quantizer.process()
            quantizer.model.save_model_to_file(str(out))
        return ModelFile(out, "onnx")
