"""A TFLite detector's post-processing, TFLite_Detection_PostProcess, as recovery sees it.

The op decodes box encodings against its anchors and keeps the best boxes after non-maximum
suppression: the number it keeps depends on the scores, nothing in it trains, and PyTorch has no
such op. What the network computes ends at its first two inputs, the box encodings [1, anchors, 4]
and the class scores [1, anchors, classes + 1]. So the pruned model is recovered on those: on a copy
that ends there (``heads_only``), against the same copy of the original, and the trained weights go
back into the whole pruned model (``with_weights_of``), which keeps its post-processing as it was.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from device_agent.detections import POSTPROCESS_OP
from host_tools.compress.model import ModelFile
from host_tools.compress.tflite import flatbuffer


def heads_only(model: ModelFile, workdir: Path) -> ModelFile | None:
    """A copy of *model* whose outputs are its post-processing op's box encodings and class scores,
    without the op, written in *workdir*; None where the model does not end in that op. Tensors and
    buffers keep their indices, so the copy's weights are the model's, buffer for buffer."""
    tree, outside = flatbuffer.read(model.path)
    graph = tree.subgraphs[0]
    custom = {i for i, code in enumerate(tree.operatorCodes) if (code.customCode or b"") == POSTPROCESS_OP.encode()}
    ends = [op for op in graph.operators if op.opcodeIndex in custom and set(op.outputs) & set(graph.outputs)]
    if len(ends) != 1 or not set(graph.outputs) <= set(ends[0].outputs):
        return None
    op = ends[0]
    graph.operators.remove(op)
    graph.outputs = np.array(op.inputs[:2], np.int32)
    for signature in tree.signatureDefs or []:
        if signature.subgraphIndex == 0:
            signature.outputs = [_signature_entry(graph, t) for t in graph.outputs]
    out = Path(workdir) / f"{model.path.stem}.heads.tflite"
    flatbuffer.write(tree, outside, out)
    return ModelFile(out, "tflite")


def with_weights_of(model: ModelFile, heads: ModelFile, out: Path) -> ModelFile:
    """*model* with the constants of *heads* (its heads_only copy, trained) in place of its own."""
    tree, outside = flatbuffer.read(model.path)
    trained, _ = flatbuffer.read(heads.path)
    for buffer, new in zip(tree.buffers, trained.buffers):
        if buffer.data is not None and new.data is not None and len(buffer.data) == len(new.data):
            buffer.data = new.data
    flatbuffer.write(tree, outside, out)
    return ModelFile(out, "tflite")


def _signature_entry(graph, tensor: int):
    from ai_edge_litert import schema_py_generated as schema

    entry = schema.TensorMapT()
    entry.name, entry.tensorIndex = graph.tensors[tensor].name, int(tensor)
    return entry
