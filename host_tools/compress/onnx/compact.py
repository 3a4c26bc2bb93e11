"""Strip what a device does not need to run the graph: internal tensor and node names (exporters
and quantizers write long paths such as ``/blocks/blocks.0/attn/qkv/MatMul_output_0_quantized``),
recorded intermediate shapes, doc strings, each node's metadata (torch.export records every node's
module path and Python stack trace: two thirds of a small CNN's file), unused initializers and
second copies of equal ones. On a small model these are a sizeable share of the file; the graph's
inputs and outputs keep their names, and the model's own metadata stays.

A float16 graph keeps its recorded shapes when ONNX Runtime would crash without them: ORT 1.32's
NCHWc layout transformer dies (SIGSEGV) creating a session for some float16 graphs whose shapes it
must infer itself (an nn.TransformerEncoder's, after the float16 converter: one residual Add whose
shape the converter had recorded). So such a graph is probed in a child process without them."""

from __future__ import annotations

from dataclasses import dataclass, field

from device_agent.errors import CompressionError
from host_tools.compress.model import ModelFile
from host_tools.compress.onnx.boundary import has_subgraphs, output_path, session_crash, subgraph_reads
from host_tools.compress.onnx.initializers import share_equal_initializers
from host_tools.compress.passes import Pass, PassConfig, failing_as, register, short_name


@register
class OnnxCompact(Pass):
    name = "onnx-compact"
    formats = ("onnx",)
    summary = "short internal names, no recorded shapes, doc strings or unused weights"
    requires = ("onnx",)
    compresses = False  # it trims a compressed model; on its own it is not a compression

    @dataclass(frozen=True)
    class Config(PassConfig):
        rename: bool = field(default=True, metadata={"help": "shorten internal tensor and node names"})

    def run(self, model, config, workdir):
        import onnx

        out = output_path(workdir, model, "compact")
        with failing_as(self.name, model):
            proto = onnx.load(str(model.path))
            half = onnx.TensorProto.FLOAT16 in {init.data_type for init in proto.graph.initializer}
            recorded = half and len(proto.graph.value_info) > 0
            compact(proto, rename=config.rename)
            onnx.save(proto, str(out))
            if recorded and session_crash(out):
                proto = onnx.load(str(model.path))
                compact(proto, rename=config.rename, shapes=True)
                onnx.save(proto, str(out))
                crash = session_crash(out)
                if crash:
                    raise CompressionError(f"ONNX Runtime crashes ({crash}) creating a CPU session for the model")
        return ModelFile(out, "onnx")


def compact(proto, *, rename: bool = True, shapes: bool = False) -> None:
    """*shapes*: keep the recorded intermediate shapes (value_info), renamed with their tensors."""
    graph = proto.graph
    proto.doc_string = ""
    graph.doc_string = ""
    if not shapes:
        del graph.value_info[:]
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output} | subgraph_reads(graph)
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    share_equal_initializers(graph)
    for node in graph.node:
        del node.metadata_props[:]
    # Subgraphs (If, Loop, Scan) refer to outer names; renaming those safely is not worth it.
    if not rename or has_subgraphs(graph):
        return
    fixed = {v.name for v in graph.input} | {v.name for v in graph.output} | {""}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if name in fixed:
            return name
        if name not in names:
            names[name] = short_name(len(names))
        return names[name]

    for init in graph.initializer:
        init.name = short(init.name)
    for value in graph.value_info:
        value.name = short(value.name)
    for node in graph.node:
        node.doc_string = ""
        node.input[:] = [short(n) for n in node.input]
        node.output[:] = [short(n) for n in node.output]
    for i, node in enumerate(graph.node):
        node.name = f"n{short_name(i)}"
