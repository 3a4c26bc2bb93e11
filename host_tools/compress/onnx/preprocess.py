"""Graph preparation before quantizing: shape inference, constant folding, simplification."""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from device_agent.errors import NotApplicable
from host_tools.compress.model import ModelFile
from host_tools.compress.onnx.boundary import (forget_counted_sizes_in, held_log_errors, output_path, quantized_already,
                                               quiet_ort_quantizer, stored_as_8_bit, typed_by_ort)
from host_tools.compress.onnx.initializers import drop_initializer_inputs, hoist_constants
from host_tools.compress.onnx.widen import widen_float16
from host_tools.compress.passes import Pass, PassConfig, failing_as, progress, register


@register
class OnnxPreprocess(Pass):
    """Weights made quantizable, then ONNX Runtime's quantization pre-processing: Constant nodes
    become initializers, initializers stop posing as graph inputs (old exporters), a float16 graph
    is widened to float32 (``widen``), symbolic and ONNX shape inference, ORT's basic graph
    optimizations (constant folding, redundant node removal), and the values ONNX's inference
    leaves untyped typed as ORT sees them (``boundary.typed_by_ort``). Plain ``quantize_dynamic``
    skips or stops on many exported graphs without it."""

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
        widen: bool = field(default=True, metadata={
            "help": "a float16 graph widened to float32, exactly, for quantizers that read float32 weights; false "
                    "for int4, whose quantizer takes float16 ones (widened, what it leaves would double in size)"})

    @quiet_ort_quantizer()
    def run(self, model, config, workdir):
        import onnx

        workdir = Path(workdir).resolve()
        out, prepared = output_path(workdir, model, "pre"), output_path(workdir, model, "pre-in")
        with failing_as(self.name, model), held_log_errors("onnxruntime.quantization.shape_inference") as held:
            source = onnx.load(str(model.path))
            if stored_as_8_bit(source.graph):  # ORT's constant folding would write them out as float again
                raise NotApplicable(f"{model.path.name} would lose its 8-bit storage to constant folding"
                                    f"{quantized_already(source.graph)}")
            drop_initializer_inputs(source)
            hoist_constants(source)
            if config.widen and widen_float16(source):
                progress(f"      {model.path.name} computes in float16: widened to float32 first, every value "
                         "exactly as it was (its inputs and outputs keep their types)")
            # Given as a file: handed a ModelProto whose symbolic inference failed, ORT's pre-processing
            # moves its weights out to an external file it never writes, and its session cannot load them.
            onnx.save(source, str(prepared))
            try:
                _pre_process(prepared, out, config, workdir)
            finally:
                prepared.unlink(missing_ok=True)
        if held:  # ORT's optimizer failed; it went on with shape inference alone
            progress(f"      ONNX Runtime's graph optimization failed ({held[-1][:120]}): shapes inferred, "
                     "graph not optimized")
        with failing_as(self.name, model):
            proto = onnx.load(str(out))
            if proto.ByteSize() < 2**31 - 2**20 and typed_by_ort(proto):  # (a model that large is left as it is)
                onnx.save(proto, str(out))
        return ModelFile(out, "onnx")


def _pre_process(prepared: Path, out: Path, config, workdir: Path) -> None:
    """ONNX Runtime's quantization pre-processing of *prepared* into *out*, in two runs: shape
    inference, then the optimizer (and ONNX's inference again), with the sizes that only the data
    decides forgotten in between (boundary.forget_counted_sizes_in). Given them, the optimizer folded a
    detector's Reshape after NMS into a target that fails on an image with no boxes."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    inferred = prepared.with_name(f"{prepared.stem}.shapes.onnx")
    # ORT's symbolic inference, when it gives up, saves the graph to the current directory
    # (sym_shape_infer_temp.onnx and its data): let it do that in a directory that goes away.
    with tempfile.TemporaryDirectory(dir=workdir) as scratch, contextlib.chdir(scratch):
        try:
            try:
                quant_pre_process(str(prepared), str(inferred), skip_optimization=True,
                                  skip_symbolic_shape=not config.symbolic_shapes)
            except Exception:
                if not config.symbolic_shapes:
                    raise
                # Symbolic inference gives up on some graphs (loops, unusual ops); ONNX's own still helps.
                quant_pre_process(str(prepared), str(inferred), skip_optimization=True, skip_symbolic_shape=True)
            forget_counted_sizes_in(inferred)
            quant_pre_process(str(inferred), str(out), skip_optimization=not config.optimize, skip_symbolic_shape=True)
        finally:
            inferred.unlink(missing_ok=True)
