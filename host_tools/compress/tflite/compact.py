"""``tflite-compact``: the TFLite counterpart of ``onnx-compact``.

Converters name every tensor after the module path it came from ("model/encoder/layer_0/attention/
torch.nn.modules.linear.Linear_q_proj;..."); on a small model those names are a fifth of the file, and
a quarter to a third of it once the weights are int8. Internal tensors get short names; the names a
caller feeds and reads (every subgraph's inputs and outputs) and the signatures stay, as do the
weights, the graph and the metadata the runtime reads (min_runtime_version). Equal shapes and
quantization parameters are written once (``flatbuffer.write``).
"""

from __future__ import annotations

from pathlib import Path

from host_tools.compress.model import ModelFile
from host_tools.compress.passes import Pass, failing_as, register, short_name
from host_tools.compress.tflite import flatbuffer


@register
class TfliteCompact(Pass):
    name = "tflite-compact"
    formats = ("tflite",)
    summary = "short internal tensor names, equal shapes and quantization parameters stored once"
    requires = ("ai_edge_litert",)
    extra = "tflite"
    compresses = False

    def run(self, model, config, workdir):
        out = Path(workdir) / f"{model.path.stem}.compact.tflite"
        with failing_as(self.name, model):
            tree, outside = flatbuffer.read(model.path)
            tree.description = None
            for graph in tree.subgraphs:
                kept = set(graph.inputs) | set(graph.outputs)
                for index, tensor in enumerate(graph.tensors):
                    if index not in kept:
                        tensor.name = short_name(index)
            flatbuffer.write(tree, outside, out)
        return ModelFile(out, "tflite")
