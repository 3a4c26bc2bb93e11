"""``tflite-compact``: the TFLite counterpart of ``onnx-compact``.

Converters name every tensor after the module path it came from ("model/encoder/layer_0/attention/
torch.nn.modules.linear.Linear_q_proj;..."); on a small model those names are a fifth of the file, and
a quarter to a third of it once the weights are int8. TFLite wires its graph by tensor index, so
internal tensors lose their names (a short name was still 2% of the reference transformer's int8
file); the names a caller feeds and reads (every subgraph's inputs and outputs) and the signatures
stay, as do the weights, the graph and the metadata (min_runtime_version, any model metadata), but
for flags only the converter reads. Equal shapes, quantization parameters and operator options are
written once (``flatbuffer.write``).
"""

from __future__ import annotations

from pathlib import Path

from host_tools.compress.model import ModelFile
from host_tools.compress.passes import Pass, failing_as, register
from host_tools.compress.tflite import flatbuffer

# Metadata the TFLite converter writes for itself (MLIR's StableHLO path), which no runtime reads.
_CONVERTER_ONLY = {b"keep_stablehlo_constant"}


@register
class TfliteCompact(Pass):
    name = "tflite-compact"
    formats = ("tflite",)
    summary = "no internal tensor names; equal shapes, quantization parameters and options stored once"
    requires = ("ai_edge_litert",)
    extra = "tflite"
    compresses = False

    def run(self, model, config, workdir):
        out = Path(workdir) / f"{model.path.stem}.compact.tflite"
        with failing_as(self.name, model):
            tree, outside = flatbuffer.read(model.path)
            tree.description = None
            for entry in [m for m in tree.metadata or () if m.name in _CONVERTER_ONLY]:
                tree.metadata.remove(entry)
                tree.buffers[entry.buffer].data = None  # left empty: buffers are referred to by index
            for graph in tree.subgraphs:
                kept = set(graph.inputs) | set(graph.outputs)
                for index, tensor in enumerate(graph.tensors):
                    if index not in kept:
                        tensor.name = None
            flatbuffer.write(tree, outside, out)
        return ModelFile(out, "tflite")
