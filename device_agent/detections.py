"""Detections: how one model's boxes pair with another's (IoU ≥ 0.5, the same label).

The compression toolkit compares a compressed detector with its original so (the agreement it
reports and guards on), and a device checks a bundle's sample output so where the number of
boxes differs from the expected (another CPU's or an accelerator's rounding moves a box across a
score threshold). A sample's rows pair by detection where one output is boxes ([n, 4], corners or
centre and size), with the labels of an integer output of one value per box where there is one;
elsewhere its rows pair only where each value has the expected shape.

A TFLite detector (the TensorFlow Object Detection API's SSDs, EfficientDet-Lite) ends in the op
TFLite_Detection_PostProcess instead, whose outputs have a fixed number of rows: boxes [1, K, 4]
(ymin, xmin, ymax, xmax), classes [1, K] (as floats), scores [1, K], and the count of rows that
are detections [1]; the rest is padding. ``unpadded`` makes those the same one array per sample
of detections, so they are compared alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

IOU = 0.5
POSTPROCESS_OP = "TFLite_Detection_PostProcess"


def as_objects(parts: list[np.ndarray]) -> np.ndarray:
    """Each sample's value (*parts*) as compare takes them: an object array of one element each
    (np.array would stack those of one shape)."""
    holder = np.empty(len(parts), dtype=object)
    for i, part in enumerate(parts):
        holder[i] = part
    return holder


def unpadded(outputs: Mapping[str, np.ndarray], padded: Sequence[str]) -> dict[str, np.ndarray]:
    """*outputs* (samples along axis 0) with a padded detector's (*padded*: the names of its boxes,
    classes, scores and count, as POSTPROCESS_OP gives them) as one array per sample of the rows
    that are detections, the classes as integers. The count goes: each sample's length is it."""
    boxes, classes, scores, count = padded
    counts = np.asarray(outputs[count]).reshape(len(outputs[count]), -1)[:, 0]
    rows = [int(np.clip(np.nan_to_num(n), 0, np.shape(outputs[boxes])[1])) for n in counts]
    cut = {boxes: np.float32, classes: np.int64, scores: np.float32}
    return {name: as_objects([np.asarray(v[:n]).astype(cut[name]) for v, n in zip(value, rows)])
            if name in cut else value for name, value in outputs.items() if name != count}


def is_boxes(value: np.ndarray) -> bool:
    """Whether one sample's *value* is boxes: [n, 4] floats."""
    return value.ndim == 2 and value.shape[1] == 4 and value.dtype.kind == "f"


@dataclass(frozen=True)
class Comparison:
    agreement: float  # the share of rows that pair, averaged over samples
    by_detection: bool  # whether rows are detections (paired by their boxes), else whole values
    cosine: float  # of the paired rows, averaged over samples that have some
    max_abs_error: float
    mean_abs_error: float


def compare(reference: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> Comparison:
    """The outputs named in *reference* (some ragged, see the module docstring), the compressed
    model's *outputs* against the original's."""
    ref = {name: list(value) for name, value in reference.items()}
    out = {name: list(outputs[name]) for name in reference}
    boxes, labels = boxes_and_labels(ref)
    agreements, cosines, errors = [], [], []
    for i in range(len(next(iter(ref.values())))):
        if boxes:
            pairs = _paired_detections(ref[boxes][i], out[boxes][i], labels and (ref[labels][i], out[labels][i]))
            rows = len(ref[boxes][i]), len(out[boxes][i])
        else:
            same = all(ref[n][i].shape == out[n][i].shape for n in ref)
            rows = (1, 1)
            pairs = [(0, 0)] if same else []
        agreements.append(1.0 if rows == (0, 0) else 2 * len(pairs) / sum(rows))
        a, b = _paired_values(ref, out, i, pairs, rows if boxes else None)
        if a.size:
            norms = np.linalg.norm(a) * np.linalg.norm(b)
            cosines.append(float(a @ b / norms) if norms > 0 else float(np.array_equal(a, b)))
            errors.append(np.abs(a - b))
    diff = np.concatenate(errors) if errors else np.zeros(0)
    return Comparison(float(np.mean(agreements)), boxes is not None, float(np.mean(cosines)) if cosines else 0.0,
                      float(diff.max()) if diff.size else 0.0, float(diff.mean()) if diff.size else 0.0)


def boxes_and_labels(ref: dict[str, list[np.ndarray]]) -> tuple[str | None, str | None]:
    """The name of the output that holds boxes ([n, 4] floats in every sample), and of the one that
    holds their labels (integers, one per box), where the outputs have them."""
    boxes = next((name for name, values in ref.items() if values and all(map(is_boxes, values))), None)
    if boxes is None:
        return None, None
    labels = next((name for name, values in ref.items() if name != boxes and all(
        v.ndim == 1 and v.dtype.kind in "iu" and len(v) == len(b) for v, b in zip(values, ref[boxes]))), None)
    return boxes, labels


def _paired_detections(ref: np.ndarray, out: np.ndarray, labels) -> list[tuple[int, int]]:
    """(original row, model row) pairs: each of the original's boxes in its order (a detector's is
    most confident first) takes the free box of the same label it overlaps most, at IoU ≥ 0.5."""
    if not len(ref) or not len(out):
        return []
    # (a box with no area, clipped flat against the image's edge, would overlap nothing, not even
    # itself: every box is given at least a thousandth of the coordinates' scale in each direction)
    least = 1e-3 * max(float(np.abs(ref).max()), float(np.abs(out).max()), 1.0)
    overlap = iou(corners(ref, least), corners(out, least))
    if labels:
        overlap = np.where(labels[0][:, None] == labels[1][None, :], overlap, 0.0)
    pairs, free = [], np.ones(len(out), bool)
    for r in range(len(ref)):
        scores = np.where(free, overlap[r], 0.0)
        best = int(scores.argmax())
        if scores[best] >= IOU:
            pairs.append((r, best))
            free[best] = False
    return pairs


def corners(boxes: np.ndarray, least: float = 0.0) -> np.ndarray:
    """[n, 4] as (x1, y1, x2, y2), each side at least *least* long: as they are where every box has
    its far corner beyond its near one, else read as (centre x, centre y, width, height), as YOLO
    writes them."""
    boxes = boxes.astype(np.float64)
    if not (np.all(boxes[:, 2] >= boxes[:, 0]) and np.all(boxes[:, 3] >= boxes[:, 1])):
        centre, half = boxes[:, :2], np.abs(boxes[:, 2:]) / 2
        boxes = np.concatenate([centre - half, centre + half], axis=1)
    return np.concatenate([boxes[:, :2], np.maximum(boxes[:, 2:], boxes[:, :2] + least)], axis=1)


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of each box of *a* with each of *b* (corners, [n, 4] and [m, 4]): [n, m]."""
    low = np.maximum(a[:, None, :2], b[None, :, :2])
    high = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(high - low, 0, None), axis=2)
    union = _area(a)[:, None] + _area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _area(boxes: np.ndarray) -> np.ndarray:
    return np.prod(np.clip(boxes[:, 2:] - boxes[:, :2], 0, None), axis=1)


def _paired_values(ref, out, i: int, pairs, rows) -> tuple[np.ndarray, np.ndarray]:
    """Sample *i*'s paired values over every output, flattened: of an output with a row per
    detection (*rows*: how many each model found), the paired rows; of any other, the whole value
    where it has the original's shape."""
    a, b = [], []
    for name in ref:
        x, y = ref[name][i], out[name][i]
        if x.dtype.kind not in "biuf" or y.dtype.kind not in "biuf":
            continue
        if rows and x.ndim and y.ndim and (len(x), len(y)) == rows:
            picked = np.array(pairs, np.int64).reshape(-1, 2)
            x, y = x[picked[:, 0]], y[picked[:, 1]]
        elif x.shape != y.shape:
            continue
        a.append(x.reshape(-1).astype(np.float64))
        b.append(y.reshape(-1).astype(np.float64))
    return (np.concatenate(a), np.concatenate(b)) if a else (np.zeros(0), np.zeros(0))
