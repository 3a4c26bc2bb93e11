"""int4 weight-only quantization of MatMul weights (blockwise, ORT's MatMulNBits): for
transformer-style models whose size is in their MatMul weights; activations stay float. With
gemm=true (the int4-weights recipe), dense layers exported as Gemm (GPT-2's Conv1D, any Linear on a
2-D input) are written as MatMul + Add first, which computes the same, and quantized too."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from device_agent.errors import NotApplicable
from host_tools.compress.model import ModelFile
from host_tools.compress.onnx.boundary import (import_leaving_logging_alone, output_path, quantized_already,
                                               quiet_ort_quantizer, weighted_nodes)
from host_tools.compress.onnx.initializers import drop_unused_initializers
from host_tools.compress.onnx.layout import attr
from host_tools.compress.passes import Pass, PassConfig, failing_as, progress, register


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
        gemm: bool = field(default=False, metadata={
            "help": "also Gemm layers (GPT-2's Conv1D, a Linear on 2-D input), written as MatMul + Add first"})

        def __post_init__(self) -> None:  # (see PassConfig)
            if self.block_size < 16 or self.block_size & (self.block_size - 1):
                raise ValueError(f"block_size must be a power of 2 from 16, not {self.block_size}")
            if not 0 <= self.accuracy_level <= 4:
                raise ValueError(f"accuracy_level must be 0 to 4, not {self.accuracy_level}")

    @quiet_ort_quantizer()
    def run(self, model, config, workdir):
        import onnx
        MatMulNBitsQuantizer = import_leaving_logging_alone(  # noqa: N806
            "onnxruntime.quantization.matmul_nbits_quantizer").MatMulNBitsQuantizer

        layers = [(n, op) for n, op in weighted_nodes(model.path, ("MatMul", "Gemm")) if n not in config.exclude]
        if not any(op == "MatMul" or config.gemm for _, op in layers):
            gemms = sum(op == "Gemm" for _, op in layers)
            raise NotApplicable(f"{model.path.name} has no MatMul with constant weights "
                                f"(int4 weight-only is for MatMul-heavy models such as transformers)" +
                                (f"; its {gemms} Gemm layer(s) would be with gemm=true" if gemms else "") +
                                quantized_already(onnx.load(str(model.path), load_external_data=False).graph))
        out = output_path(workdir, model, "int4")
        with failing_as(self.name, model):
            proto = onnx.load(str(model.path))
            share = _weight_share(proto, ("MatMul", "Gemm") if config.gemm else ("MatMul",), set(config.exclude))
            if share is not None and share < 0.5:
                reach = f"{share:.0%}" if share >= 0.01 else "under 1%"
                progress(f"      int4 reaches {reach} of the weights (MatMul/Gemm only): try an int8 recipe")
            rewritten = gemms_as_matmuls(proto, set(config.exclude)) if config.gemm else 0
            if rewritten:
                progress(f"      {rewritten} Gemm layer(s) written as MatMul + Add, for their weights to be int4")
            quantizer = MatMulNBitsQuantizer(proto, bits=4, block_size=config.block_size,
                                             is_symmetric=config.symmetric, accuracy_level=config.accuracy_level,
                                             nodes_to_exclude=list(config.exclude))
            quantizer.process()
            quantizer.model.save_model_to_file(str(out))
        return ModelFile(out, "onnx")


def _weight_share(proto, op_types: tuple[str, ...], exclude: set[str]) -> float | None:
    """The share of the graph's float weights (initializers of rank 2 or more) that are the
    constant right-hand side of a MatMul/Gemm of *op_types*: what int4 can reach (None: the
    graph keeps no float weights as initializers)."""
    from onnx import TensorProto

    sizes = {i.name: math.prod(i.dims) for i in proto.graph.initializer
             if len(i.dims) >= 2 and i.data_type == TensorProto.FLOAT}
    reached = {n.input[1] for n in proto.graph.node
               if n.op_type in op_types and n.name not in exclude and len(n.input) > 1 and n.input[1] in sizes}
    total = sum(sizes.values())
    return sum(sizes[name] for name in reached) / total if total else None


def gemms_as_matmuls(proto, exclude: set[str]) -> int:
    """Gemm(A, B, C) with a constant B, alpha = beta = 1 and A not transposed, as MatMul(A, B) + C
    (B transposed into a weight of its own where the Gemm read it transposed); returns how many.
    The MatMul keeps the Gemm's name, so exclude still names it."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    nodes, count, transposed_from = [], 0, set()
    for node in graph.node:
        weight = node.input[1] if node.op_type == "Gemm" and len(node.input) > 1 else None
        if weight not in inits or len(inits[weight].dims) != 2 or node.name in exclude or \
                attr(node, "alpha", 1.0) != 1.0 or attr(node, "beta", 1.0) != 1.0 or attr(node, "transA", 0):
            nodes.append(node)
            continue
        if attr(node, "transB", 0):
            transposed_from.add(weight)
            if f"{weight}.T" not in inits:
                inits[f"{weight}.T"] = numpy_helper.from_array(numpy_helper.to_array(inits[weight]).T.copy(),
                                                               f"{weight}.T")
                graph.initializer.append(inits[f"{weight}.T"])
            weight = f"{weight}.T"
        has_bias = len(node.input) > 2 and node.input[2]
        product = f"{node.output[0]}.matmul" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], weight], [product], name=node.name))
        if has_bias:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}.bias"))
        count += 1
    if count:
        del graph.node[:]
        graph.node.extend(nodes)
        drop_unused_initializers(graph, transposed_from)
    return count
