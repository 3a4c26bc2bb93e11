"""Graph preparation before quantizing: shape inference, constant folding, simplification."""

from __future__ import annotations

from dataclasses import dataclass, field

from host_tools.compress.model import ModelFile
from host_tools.compress.onnx.boundary import (drop_initializer_inputs, hoist_constants, output_path,
                                                quiet_ort_quantizer)
from host_tools.compress.passes import Pass, PassConfig, failing_as, register


@register
class OnnxPreprocess(Pass):
    """Weights made quantizable, then ONNX Runtime's quantization pre-processing: Constant nodes
    become initializers, initializers stop posing as graph inputs (old exporters), symbolic and
    ONNX shape inference, ORT's basic graph optimizations (constant folding, redundant node
    removal). Plain ``quantize_dynamic`` skips or stops on many exported graphs without it."""

    name = "onnx-preprocess"
    formats = ("onnx",)
    summary = "shape inference, constant folding and graph simplification"
    requires = ("onnx", "onnxruntime", "sympy")
    compresses = False

    @dataclass(frozen=True)
    class Config(PassConfig):
        optimize: bool = field(default=True, metadata={
            "help": "run ORT's basic graph optimizations (constant folding; also fuses MatMul+Add into Gemm)"})
        symbolic_shapes: bool = field(default=True, metadata={
            "help": "symbolic shape inference (falls back to ONNX's own when it cannot)"})

    def run(self, model, config, workdir):
        import onnx
        from onnxruntime.quantization.shape_inference import quant_pre_process

        quiet_ort_quantizer()
        out = output_path(workdir, model, "pre")
        with failing_as(self.name, model):
            source = onnx.load(str(model.path))
            drop_initializer_inputs(source)
            hoist_constants(source)
            try:
                quant_pre_process(source, str(out), skip_optimization=not config.optimize,
                                  skip_symbolic_shape=not config.symbolic_shapes)
            except Exception:
                if not config.symbolic_shapes:
                    raise
                # Symbolic inference gives up on some graphs (loops, unusual ops); ONNX's own still helps.
                quant_pre_process(source, str(out), skip_optimization=not config.optimize,
                                  skip_symbolic_shape=True)
        return ModelFile(out, "onnx")
