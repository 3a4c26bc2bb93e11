"""Ultralytics YOLO detectors, as `yolo export format=onnx` writes them: their detections, decoded as
Ultralytics' own predict decodes them, so that a compressed model is compared detection by detection.

Such an export's output is the raw head, ``output0`` [batch, 4 + classes, anchors] (YOLOv8, YOLO11:
each anchor's box as centre x, centre y, width, height in pixels, then its class scores, after the
sigmoid), or, exported with ``nms=True`` or end to end (YOLOv10, YOLO26), rows of detections
[batch, N, 6] (x1, y1, x2, y2, score, class). Read as a classifier's output, as any other [N, C, A]
float tensor is, the top-1 agreement would be over anchors or coordinates, a number about nothing.
The export says what it is in the model's metadata (``task: detect``, ``names``, ``end2end``), so
the output is recognized from that, never from its shape alone. Each image's detections are the
anchors whose best class scores at least CONF, after non-maximum suppression within each class at
IOU, at most MAX_DET (Ultralytics' predict defaults), most confident first: boxes (x1, y1, x2, y2),
scores and labels, which ``device_agent.detections.compare`` pairs with the original's.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from device_agent.detections import as_objects, iou

CONF, IOU, MAX_DET = 0.25, 0.7, 300
CANDIDATES = 3000  # the most confident anchors non-maximum suppression looks at (Ultralytics: 30000)


@dataclass(frozen=True)
class Head:
    output: str  # the output's name
    classes: int
    rows: bool  # detections as rows (x1, y1, x2, y2, score, class) already


def head(path: Path, outputs) -> Head | None:
    """The Ultralytics detection head among *outputs* (a runtime's TensorSpecs) of the ONNX model at
    *path*, by the metadata the export writes; None for any other model."""
    meta, names = _metadata(path)
    if names is None or not outputs:
        return None
    first, classes = outputs[0], len(names)
    shape = list(first.shape)
    if len(shape) != 3:
        return None
    if shape[2] == 6 and (meta.get("end2end") == "True" or shape[1] != 4 + classes):
        return Head(first.name, classes, rows=True)
    return Head(first.name, classes, rows=False) if shape[1] == 4 + classes else None


def _metadata(path: Path, proto=None) -> tuple[dict[str, str], dict | None]:
    """The model's metadata, and its class names where it says it is an Ultralytics detector."""
    import onnx

    try:
        proto = proto or onnx.load(str(path), load_external_data=False)
        meta = {p.key: p.value for p in proto.metadata_props}
        names = ast.literal_eval(meta.get("names", "None"))
    except (ValueError, SyntaxError, OSError):
        return {}, None
    return meta, names if meta.get("task") == "detect" and isinstance(names, dict) else None


def decode_nodes(proto) -> list[str]:
    """An Ultralytics detector's decode: the nodes after which no layer with weights runs (the boxes'
    arithmetic, the scores' sigmoid, the Concat that joins boxes in pixels and scores from 0 to 1
    into one output), by name; none for any other model (*proto*: an ONNX ModelProto). Static int8
    leaves them in float: with one scale for that Concat, the scores are rounded to a step of about a
    pixel's, and there are no weights there to shrink."""
    if _metadata(Path(), proto)[1] is None:
        return []
    graph = proto.graph
    weights = {i.name for i in graph.initializer if len(i.dims) >= 2}
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    feeds_a_layer: set[str] = set()  # nodes from which a layer with weights is reached
    for node in reversed(graph.node):  # (in topological order: what reads a node's outputs comes after it)
        if weights.intersection(node.input) or any(r.name in feeds_a_layer for out in node.output
                                                   for r in readers.get(out, ())):
            feeds_a_layer.add(node.name)
    return [n.name for n in graph.node if n.name and n.name not in feeds_a_layer and n.op_type != "Constant"]


def decoded(outputs: dict[str, np.ndarray], found: Head) -> dict[str, np.ndarray]:
    """*outputs* (samples along axis 0) with the head's replaced by each sample's detections: outputs
    "<name>.boxes", "<name>.scores" and "<name>.labels", one array per sample."""
    per_image = [_rows(value) if found.rows else _detections(value) for value in outputs[found.output]]
    out = {}
    for name, value in outputs.items():
        if name != found.output:
            out[name] = value
            continue
        for i, part in enumerate(("boxes", "scores", "labels")):
            out[f"{name}.{part}"] = as_objects([d[i] for d in per_image])
    return out


def _rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's rows (x1, y1, x2, y2, score, class) as (boxes, scores, labels), most confident first."""
    kept = rows[rows[:, 4] >= CONF]
    kept = kept[np.argsort(-kept[:, 4], kind="stable")]
    return (kept[:, :4].astype(np.float32), kept[:, 4].astype(np.float32),
            np.round(kept[:, 5]).astype(np.int64))


def _detections(head: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's [4 + classes, anchors] as (boxes, scores, labels)."""
    scores_all = head[4:].astype(np.float32)
    labels, scores = scores_all.argmax(axis=0), scores_all.max(axis=0)
    keep = np.flatnonzero(scores >= CONF)
    keep = keep[np.argsort(-scores[keep], kind="stable")][:CANDIDATES]
    centre, size = head[:2, keep].T, head[2:4, keep].T
    boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1).astype(np.float32)
    chosen = _nms(boxes, labels[keep])[:MAX_DET]
    return boxes[chosen], scores[keep][chosen], labels[keep][chosen].astype(np.int64)


def _nms(boxes: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Indices of *boxes* (most confident first) that no more confident box of the same label
    overlaps at IoU > IOU: each label's boxes moved apart from the others', as torchvision's
    batched_nms does, then one greedy pass."""
    if not len(boxes):
        return np.zeros(0, np.int64)
    shifted = boxes + (labels * (float(np.abs(boxes).max()) + 1))[:, None]
    alive, kept = np.ones(len(boxes), bool), []
    for i in range(len(boxes)):
        if not alive[i]:
            continue
        kept.append(i)
        alive[i + 1:] &= ~(iou(shifted[i:i + 1], shifted[i + 1:])[0] > IOU)
    return np.array(kept, np.int64)
