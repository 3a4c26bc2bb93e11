"""Ultralytics YOLO models, as `yolo export` writes them to ONNX or TFLite: their detections, decoded
as Ultralytics' own predict decodes them, so that a compressed model is compared detection by
detection.

Such an export's first output is the raw head, [batch, 4 + classes + extra, anchors] (YOLOv8,
YOLO11: each anchor's box as centre x, centre y, width, height, then its class scores, after the
sigmoid, then what the task adds per box), or, exported with ``nms=True`` or end to end (YOLOv10,
YOLO26), rows of detections [batch, N, 6 + extra] (x1, y1, x2, y2, score, class, then the same
extra). The extra is a pose model's keypoints (``kpt_shape``: K keypoints of x, y and, where there
are three values, visibility), a segmenter's mask coefficients (its second output is the prototype
masks they weigh, compared as values), or an oriented box's angle (OBB: its box is centre and size,
rows too, turned by the angle). YOLOv5's export (and YOLOv7's) is [batch, anchors, 5 + classes]:
the box, then its objectness, then class probabilities; YOLOv9's is laid out as YOLOv8's. Read as
a classifier's output, as any other [N, C, A] float tensor is, the top-1 agreement would be over
anchors or coordinates, a number about nothing.

The export says what it is in its metadata (``task``, ``names``, ``end2end``, ``args``; YOLOv5's,
YOLOv7's and YOLOv9's only ``stride`` and ``names``, and which layout, the output's shape), in an
ONNX model's metadata_props or in a zip appended to a TFLite file, so the output is recognized from
that, never from its shape alone. A TFLite export's coordinates are fractions of the image (so that
int8 keeps the scores' resolution); they are multiplied back by its width and height, where and as
Ultralytics' LiteRT backend does. Each image's detections are the anchors whose best class scores
over CONF (YOLOv5: whose objectness does, and the score is the class's probability times it), after
non-maximum suppression within each class at IOU (oriented boxes on their probabilistic IoU, as
Ultralytics' fast NMS), at most MAX_DET (YOLOv5's, YOLOv7's and YOLOv9's: V5_IOU, V5_MAX_DET): the
predict defaults. Scored against ground-truth boxes (mAP, ``truth``), detections are decoded as
`yolo val` decodes them instead (``for_validation``): every anchor over VAL_CONF.
Most confident first: boxes (x1, y1, x2, y2; an oriented box's axis-aligned bounds), scores, labels
and the task's values per box, which ``device_agent.detections.compare`` pairs with the original's.
"""

from __future__ import annotations

import ast
import json
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from device_agent.detections import as_objects, iou

CONF, IOU, MAX_DET = 0.25, 0.7, 300
V5_IOU, V5_MAX_DET = 0.45, 1000  # detect.py's defaults in YOLOv5's repository, and YOLOv7's and YOLOv9's
VAL_CONF, VAL_MAX_DET, V5_VAL_IOU = 0.001, 300, 0.6  # `yolo val`'s (at IOU), and YOLOv5's val.py's
CANDIDATES = 3000  # the most confident anchors non-maximum suppression looks at (Ultralytics: 30000)
TASKS = ("detect", "pose", "segment", "obb")  # the tasks whose first output is a detection head
PARTS = {"pose": "keypoints", "segment": "mask_coefficients", "obb": "xywhr"}  # the task's values per box
LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")  # the ops that read a weight as their second input
_PARSED = ("imgsz", "names", "kpt_shape", "args", "end2end")  # (what Ultralytics parses from text)


@dataclass(frozen=True)
class Head:
    output: str  # the output's name
    classes: int
    rows: bool  # detections as rows (x1, y1, x2, y2, score, class, extra) already
    task: str = "detect"
    extra: int = 0  # values per box after the class scores (rows: after score and class)
    keypoint_values: int = 2  # (pose) values per keypoint: x, y and, where 3, visibility
    scale: tuple[int, int] | None = None  # (width, height) where coordinates are fractions of the image
    objectness: bool = False  # YOLOv5's layout: [anchors, 5 + classes], each box's objectness before its scores
    iou: float = IOU  # NMS's threshold, and how many detections it keeps: its predict's defaults
    max_det: int = MAX_DET
    conf: float = CONF  # the least score of a detection (over it)


def for_validation(found: Head) -> Head:
    """*found* decoded as its validation decodes it, for mAP: Ultralytics' `yolo val`, or YOLOv5's
    val.py for its layout (YOLOv9's val.py uses Ultralytics' numbers)."""
    return replace(found, conf=VAL_CONF, iou=V5_VAL_IOU if found.objectness else IOU, max_det=VAL_MAX_DET)


def metadata(path: Path, model_format: str, proto=None) -> dict:
    """The metadata of an Ultralytics export, its values parsed as Ultralytics parses them, end2end
    true also where it was exported with NMS (``args.nms``); {} for any other model. ONNX: the
    model's metadata_props (*proto*, where it is loaded already); TFLite: the zip appended to the
    file, its metadata.json, or the one entry of an older export (a Python dict's text)."""
    try:
        if model_format == "onnx":
            import onnx

            proto = proto or onnx.load(str(path), load_external_data=False)
            meta = {p.key: p.value for p in proto.metadata_props}
        else:
            with zipfile.ZipFile(path) as appended:
                names = appended.namelist()
                text = appended.read("metadata.json" if "metadata.json" in names else names[0]).decode()
            meta = json.loads(text) if "metadata.json" in names else ast.literal_eval(text)
        if not isinstance(meta, dict):
            return {}
        meta = {key: ast.literal_eval(value) if key in _PARSED and isinstance(value, str) else value
                for key, value in meta.items()}
        meta["channels"] = int(meta.get("channels", 3))
    except (ValueError, TypeError, SyntaxError, OSError, IndexError, KeyError, zipfile.BadZipFile):
        return {}
    if not isinstance(meta.get("args", {}), dict):
        return {}
    meta["end2end"] = bool(meta.get("end2end") or meta.get("args", {}).get("nms"))
    if isinstance(meta.get("names"), list):  # (older YOLOv5 exports)
        meta["names"] = dict(enumerate(meta["names"]))
    if "task" not in meta and "stride" in meta and isinstance(meta.get("names"), dict):
        # (YOLOv5's, YOLOv7's and YOLOv9's exports write only these two; which layout, the output says)
        meta.update(task="detect", objectness=None)
    return meta


def head(model, runtime) -> Head | None:
    """The Ultralytics detection head among the outputs of *model* (a ModelFile, loaded as
    *runtime*), by the metadata its export writes; None for any other model, and where the first
    output of three axes is not as its task makes it."""
    meta = metadata(model.path, model.format)
    task, names = meta.get("task"), meta.get("names")
    found = next((o for o in runtime.outputs if len(o.shape) == 3), None)
    if task not in TASKS or not isinstance(names, dict) or not names or found is None:
        return None
    rows, objectness, repository = meta["end2end"], meta.get("objectness", False), "objectness" in meta
    if repository:  # (YOLOv5's [anchors, 5 + classes], or YOLOv9's, as YOLOv8's)
        objectness = found.shape[2] == 5 + len(names)
    width = found.shape[2] if rows or objectness else found.shape[1]
    wanted = _per_box(task, meta)
    before = 6 if rows else 5 + len(names) if objectness else 4 + len(names)  # (what comes before the extra)
    extra = width - before if isinstance(width, int) else -1
    if wanted is None or (extra <= 0 if task == "segment" else extra != wanted):
        return None
    scale = _fractions_of(runtime.inputs[0].shape, meta, rows) if model.format == "tflite" else None
    return Head(found.name, len(names), rows, task, extra, meta["kpt_shape"][1] if task == "pose" else 2, scale,
                objectness, *((V5_IOU, V5_MAX_DET) if repository else (IOU, MAX_DET)))


def channels_of(model, runtime, output_names: list[str]) -> dict[int, tuple[int, slice]]:
    """Where *model* (loaded as *runtime*) is an Ultralytics export, {the index of its head among
    *output_names*: (the axis of that output, samples first, along which each box's values lie,
    where its scores after their sigmoid are)}: trainer.distill trains those as probabilities and
    the rest (boxes in pixels, the task's values) each by its own spread; else {}."""
    found = head(model, runtime)
    if found is None or found.output not in output_names:
        return {}
    scores = slice(4, 5) if found.rows else slice(4, 5 + found.classes if found.objectness else 4 + found.classes)
    return {output_names.index(found.output): (2 if found.rows or found.objectness else 1, scores)}


def _per_box(task: str, meta: dict) -> int | None:
    """How many values per box *task* adds after the class scores: a pose model's kpt_shape
    [keypoints, values each] multiplied out, 1 angle, or 0 (for segment, which may have any number
    of mask coefficients); None where kpt_shape is not two counts."""
    if task != "pose":
        return {"obb": 1}.get(task, 0)
    shape = meta.get("kpt_shape")
    if not (isinstance(shape, (list, tuple)) and len(shape) == 2 and all(isinstance(k, int) and k > 0 for k in shape)):
        return None
    return shape[0] * shape[1]


def _fractions_of(shape, meta: dict, rows: bool) -> tuple[int, int] | None:
    """The image's (width, height) where a TFLite export's coordinates are fractions of it, as
    Ultralytics' LiteRT backend reads them (*shape*: the input's): a raw head's always; end-to-end
    rows where the input is channels last (onnx2tf's; litert-torch's, channels first, are pixels)."""
    channels_last = len(shape) == 4 and shape[-1] == meta["channels"]
    if len(shape) != 4 or rows and not channels_last:
        return None
    height, width = shape[1:3] if channels_last else shape[2:4]
    if not (isinstance(width, int) and isinstance(height, int)):  # (a dynamic size: the size exported at)
        size = meta.get("imgsz")
        height, width = (size, size) if isinstance(size, int) else (list(size or [0, 0]) * 2)[:2]
    return (int(width), int(height)) if width and height else None


def decode_nodes(proto) -> list[str]:
    """An Ultralytics model's decode: the nodes after which no layer with weights runs (the boxes'
    arithmetic, the scores' sigmoid, the Concat that joins boxes in pixels and scores from 0 to 1
    into one output), by name; none for any other model (*proto*: an ONNX ModelProto). Static int8
    leaves them in float: with one scale for that Concat, the scores are rounded to a step of about a
    pixel's, and there are no weights there to shrink."""
    if metadata(Path(), "onnx", proto).get("task") not in TASKS:
        return []
    graph = proto.graph
    weights = {i.name for i in graph.initializer if len(i.dims) >= 2}
    # (a layer: an op with a weight; YOLOv5's anchor grid, a constant of several axes that a Mul
    # reads, is the decode's)
    ops = [(n.op_type in LAYERS and bool(weights.intersection(n.input[1:2])), n.input, n.output) for n in graph.node]
    return [graph.node[k].name for k in after_layers(ops)
            if graph.node[k].name and graph.node[k].op_type != "Constant"]


def after_layers(ops) -> list[int]:
    """The indices of *ops*, in order of execution, each (whether it is a layer with weights, its
    inputs, its outputs), from which no layer is reached: a detector's decode, in an ONNX graph
    (decode_nodes) or a TFLite one (tflite-int8's kept_float)."""
    readers: dict = {}
    for k, (_, inputs, _) in enumerate(ops):
        for name in inputs:
            readers.setdefault(name, []).append(k)
    feeds_a_layer: set[int] = set()
    for k in reversed(range(len(ops))):  # (what reads an op's outputs comes after it)
        layer, _, outputs = ops[k]
        if layer or any(r in feeds_a_layer for out in outputs for r in readers.get(out, ())):
            feeds_a_layer.add(k)
    return [k for k in range(len(ops)) if k not in feeds_a_layer]


def decoded(outputs: dict[str, np.ndarray], found: Head) -> dict[str, np.ndarray]:
    """*outputs* (samples along axis 0) with the head's replaced by each sample's detections: outputs
    "<name>.boxes", "<name>.scores", "<name>.labels" and, for a task that adds values per box,
    "<name>.<PARTS[task]>", one array per sample."""
    decode = _rows if found.rows else _detections
    per_image = [decode(_in_pixels(value if found.rows or found.objectness else value.T, found), found)
                 for value in outputs[found.output]]
    parts = ("boxes", "scores", "labels") + ((PARTS[found.task],) if found.task in PARTS else ())
    out = {}
    for name, value in outputs.items():
        if name != found.output:
            out[name] = value
            continue
        for i, part in enumerate(parts):
            out[f"{name}.{part}"] = as_objects([d[i] for d in per_image])
    return out


def _in_pixels(table: np.ndarray, found: Head) -> np.ndarray:
    """One image's detections, a row each (box, then scores or score and class, then the extra),
    with the box and a pose's keypoints multiplied back to pixels where they are fractions."""
    table = table.astype(np.float32)  # (a copy)
    if found.scale:
        width, height = found.scale
        table[:, [0, 2]] *= width
        table[:, [1, 3]] *= height
        if found.task == "pose":
            first, step = table.shape[1] - found.extra, found.keypoint_values
            table[:, first::step] *= width
            table[:, first + 1::step] *= height
    return table


def _rows(rows: np.ndarray, found: Head) -> tuple[np.ndarray, ...]:
    """One image's rows (box, score, class, extra) as (boxes, scores, labels[, extra]), most
    confident first."""
    kept = rows[rows[:, 4] > found.conf]
    kept = kept[np.argsort(-kept[:, 4], kind="stable")]
    extra = kept[:, 6:]
    boxes = kept[:, :4]
    if found.task == "obb":  # (centre, size and, last, the angle)
        extra = np.concatenate([boxes, extra[:, -1:]], axis=1)
        boxes = _bounds(extra)
    return (boxes, kept[:, 4], np.round(kept[:, 5]).astype(np.int64)) + ((extra,) if found.extra else ())


def _detections(table: np.ndarray, found: Head) -> tuple[np.ndarray, ...]:
    """One image's anchors, a row each (centre x, centre y, width, height[, objectness], class
    scores, extra), as (boxes, scores, labels[, extra])."""
    first = 5 if found.objectness else 4
    scores_all = table[:, first:first + found.classes]
    if found.objectness:  # (YOLOv5: a box is a candidate where its objectness is over CONF, and a
        scores_all = scores_all * table[:, 4:5]  # class's score is its probability times that)
    labels, scores = scores_all.argmax(axis=1), scores_all.max(axis=1)
    keep = np.flatnonzero((scores > found.conf) & (table[:, 4] > found.conf if found.objectness else True))
    keep = keep[np.argsort(-scores[keep], kind="stable")][:CANDIDATES]
    extra, labels, scores = table[keep, first + found.classes:], labels[keep], scores[keep]
    if found.task == "obb":
        extra = np.concatenate([table[keep, :4], extra], axis=1)
        boxes = _bounds(extra)
        chosen = _rotated_nms(extra, labels)[:found.max_det]
    else:
        centre, size = table[keep, :2], table[keep, 2:4]
        boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1)
        chosen = _nms(boxes, labels, found.iou)[:found.max_det]
    found_here = (boxes[chosen], scores[chosen], labels[chosen].astype(np.int64))
    return found_here + ((extra[chosen],) if found.extra else ())


def _bounds(xywhr: np.ndarray) -> np.ndarray:
    """Oriented boxes (centre x, centre y, width, height, angle in radians) as the corners of the
    axis-aligned boxes that bound them, as Ultralytics' ``obb.xyxy``."""
    cos, sin = np.abs(np.cos(xywhr[:, 4])), np.abs(np.sin(xywhr[:, 4]))
    half_w, half_h = xywhr[:, 2] / 2, xywhr[:, 3] / 2
    reach = np.stack([half_w * cos + half_h * sin, half_w * sin + half_h * cos], axis=1)
    return np.concatenate([xywhr[:, :2] - reach, xywhr[:, :2] + reach], axis=1)


def _nms(boxes: np.ndarray, labels: np.ndarray, threshold: float = IOU) -> np.ndarray:
    """Indices of *boxes* (most confident first) that no more confident box of the same label
    overlaps at IoU > *threshold*: each label's boxes moved apart from the others', as torchvision's
    batched_nms does, then one greedy pass."""
    if not len(boxes):
        return np.zeros(0, np.int64)
    shifted = boxes + (labels * (float(np.abs(boxes).max()) + 1))[:, None]
    alive, kept = np.ones(len(boxes), bool), []
    for i in range(len(boxes)):
        if not alive[i]:
            continue
        kept.append(i)
        alive[i + 1:] &= ~(iou(shifted[i:i + 1], shifted[i + 1:])[0] > threshold)
    return np.array(kept, np.int64)


def _rotated_nms(xywhr: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Indices of oriented boxes (most confident first) that no more confident box of the same
    label overlaps at probabilistic IoU > IOU, suppressed or not: Ultralytics' fast NMS for OBB."""
    suppressed = np.zeros(len(xywhr), bool)
    for i in range(len(xywhr) - 1):
        rest = slice(i + 1, None)
        suppressed[rest] |= (labels[rest] == labels[i]) & (_probiou(xywhr[i], xywhr[rest]) > IOU)
    return np.flatnonzero(~suppressed)


def _probiou(box: np.ndarray, others: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """The probabilistic IoU (1 - the Hellinger distance of the boxes' Gaussians, arXiv 2106.06072)
    of one oriented box with each of *others*, as Ultralytics' batch_probiou."""
    box, others = box.astype(np.float64), others.astype(np.float64)
    (a1, b1, c1), (a2, b2, c2) = _covariance(box[None]), _covariance(others)
    a, b, c = a1 + a2, b1 + b2, c1 + c2
    dx, dy = box[0] - others[:, 0], box[1] - others[:, 1]
    det = a * b - c ** 2
    t1 = (a * dy ** 2 + b * dx ** 2) / (det + eps) * 0.25
    t2 = (c * -dx * dy) / (det + eps) * 0.5
    own = np.clip(a1 * b1 - c1 ** 2, 0, None) * np.clip(a2 * b2 - c2 ** 2, 0, None)
    t3 = np.log(det / (4 * np.sqrt(own) + eps) + eps) * 0.5
    distance = np.clip(t1 + t2 + t3, eps, 100.0)
    return 1 - np.sqrt(1 - np.exp(-distance) + eps)


def _covariance(xywhr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The covariance [[a, c], [c, b]] of each oriented box's Gaussian."""
    w2, h2 = xywhr[:, 2] ** 2 / 12, xywhr[:, 3] ** 2 / 12
    cos, sin = np.cos(xywhr[:, 4]), np.sin(xywhr[:, 4])
    return w2 * cos ** 2 + h2 * sin ** 2, w2 * sin ** 2 + h2 * cos ** 2, (w2 - h2) * cos * sin
