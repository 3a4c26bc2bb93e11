"""TFLite models the tests build from the fixtures, with LiteRT's own schema (no converter needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from host_tools.compress.tflite import flatbuffer
from tests.conftest import FIXTURES


def ssd(out: Path, max_detections: int = 10, score_threshold: float = 0.37) -> Path:
    """The detector fixture (image [1, 3, 64, 64] -> box encodings [1, 960, 4], class scores
    [1, 960, 3] with the background first) ending as the TensorFlow Object Detection API's SSDs end:
    in TFLite_Detection_PostProcess against 960 anchors, with its custom options as a flexbuffer
    map. Outputs: boxes [1, K, 4], classes [1, K], scores [1, K] and the count of detections [1]."""
    from ai_edge_litert import schema_py_generated as schema
    from flatbuffers import flexbuffers

    tree, outside = flatbuffer.read(FIXTURES / "detector.tflite")
    graph = tree.subgraphs[0]
    encodings, scores = (int(t) for t in graph.outputs)
    rng = np.random.default_rng(0)
    anchors = np.concatenate([rng.random((960, 2)), 0.1 + 0.3 * rng.random((960, 2))], axis=1)  # yc, xc, h, w

    def tensor(name: str, shape: list[int], data: np.ndarray | None = None) -> int:
        t, buffer = schema.TensorT(), schema.BufferT()
        t.name, t.shape, t.type = name.encode(), np.array(shape, np.int32), schema.TensorType.FLOAT32
        buffer.data = None if data is None else np.frombuffer(data.astype(np.float32).tobytes(), np.uint8)
        tree.buffers.append(buffer)
        t.buffer = len(tree.buffers) - 1
        graph.tensors.append(t)
        return len(graph.tensors) - 1

    k = max_detections
    made = [tensor("TFLite_Detection_PostProcess", [1, k, 4]), tensor("TFLite_Detection_PostProcess:1", [1, k]),
            tensor("TFLite_Detection_PostProcess:2", [1, k]), tensor("TFLite_Detection_PostProcess:3", [1])]
    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.CUSTOM
    code.customCode, code.version = b"TFLite_Detection_PostProcess", 1
    tree.operatorCodes.append(code)
    options = flexbuffers.Builder()
    with options.Map():
        for key, value in (("max_detections", k), ("max_classes_per_detection", 1), ("detections_per_class", 100),
                           ("num_classes", 2)):
            options.Int(key, value)
        options.Bool("use_regular_nms", False)
        for key, value in (("nms_score_threshold", score_threshold), ("nms_iou_threshold", 0.6), ("y_scale", 10.0),
                           ("x_scale", 10.0), ("h_scale", 5.0), ("w_scale", 5.0)):
            options.Float(key, value)
    op = schema.OperatorT()
    op.opcodeIndex = len(tree.operatorCodes) - 1
    op.inputs = np.array([encodings, scores, tensor("anchors", [960, 4], anchors)], np.int32)
    op.outputs = np.array(made, np.int32)
    op.customOptions = np.frombuffer(bytes(options.Finish()), np.uint8)
    op.customOptionsFormat = schema.CustomOptionsFormat.FLEXBUFFERS
    graph.operators.append(op)
    graph.outputs = np.array(made, np.int32)
    flatbuffer.write(tree, outside, out)
    return out
