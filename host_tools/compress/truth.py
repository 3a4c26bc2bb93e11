"""A detector's labels: ground-truth boxes, and the mean average precision of its detections
against them, the task accuracy a detector is guarded on as a classifier is on its top-1 accuracy.

The boxes are given as ``label_boxes`` (NAME) beside the inputs: in an ``.npz`` or a folder's
``label_boxes.npy``, a table of rows (sample, class, x1, y1, x2, y2), the sample's index in the
data, the class as the model numbers them, and the box's corners in the coordinates of the
model's boxes (an Ultralytics export's: pixels of its input image, as letterboxed for it); a
loader may give the same table, or one [n, 5] array (class, x1, y1, x2, y2) per sample. They are
kept as one [n, 5] array per sample (``is_truth``).

mAP is COCO's: each image's detections, most confident first, take the unmatched box of their
class they overlap most at IoU ≥ t; each class's precision over recall is made monotone and read
at 101 recall points; the mean is over the classes that have boxes, at IoU 0.5 (mAP50) and at
each of 0.5, 0.55, …, 0.95 (mAP50-95, the accuracy). A class with boxes that the model never
detects counts 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from device_agent.detections import as_objects, boxes_and_labels, corners, iou
from device_agent.errors import ConfigError

NAME = "label_boxes"
COLUMNS = "sample, class, x1, y1, x2, y2"
METRIC = "mAP50-95 against the labelled boxes (COCO's: IoU 0.5 to 0.95, 101 recall points)"
THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALLS = np.linspace(0.0, 1.0, 101)


def is_truth(labels) -> bool:
    """Whether *labels* are ground-truth boxes, one [n, 5] array per sample (from_table's)."""
    return (isinstance(labels, np.ndarray) and labels.dtype == object and labels.ndim == 1
            and all(isinstance(v, np.ndarray) and v.ndim == 2 and v.shape[1] == 5 for v in labels))


def from_table(table, count: int, source: str) -> np.ndarray:
    """Rows (sample, class, x1, y1, x2, y2) as one [n, 5] float64 array per sample of *count*."""
    try:
        table = np.asarray(table, dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {NAME} must be numbers, rows of ({COLUMNS})") from None
    if table.ndim != 2 or table.shape[1] != 6:
        raise ConfigError(f"{source}: {NAME} must be rows of ({COLUMNS}), a [boxes, 6] array, not "
                          f"{list(table.shape)}")
    for why, rows in _faults(table, count):
        if rows.any():
            raise ConfigError(f"{source}: {NAME} row {int(np.flatnonzero(rows)[0])}: {why}")
    if not len(table):
        raise ConfigError(f"{source}: {NAME} holds no boxes: there is nothing to score detections against")
    samples = table[:, 0].astype(np.int64)
    return as_objects([table[samples == i, 1:] for i in range(count)])


def _faults(table: np.ndarray, count: int):
    """(what is wrong, which rows) for each way a row can be wrong, in the order they are looked at."""
    whole = np.isfinite(table[:, :2]) & (table[:, :2] == np.round(table[:, :2]))
    yield "not finite", ~np.isfinite(table).all(axis=1)
    yield "the sample and the class must be whole numbers", ~whole.all(axis=1)
    yield f"the sample must be from 0 to {count - 1}", (table[:, 0] < 0) | (table[:, 0] >= count)
    yield "the class must be 0 or more", table[:, 1] < 0
    backwards = (table[:, 4] < table[:, 2]) | (table[:, 5] < table[:, 3])
    yield "x2 must not be less than x1, nor y2 than y1 (corners)", backwards


def from_samples(per_sample, source: str) -> np.ndarray:
    """A loader's one [n, 5] array (class, x1, y1, x2, y2) per sample, checked as from_table checks."""
    rows = []
    for i, boxes in enumerate(per_sample):
        try:
            boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 5)
        except (TypeError, ValueError):  # (not numbers, rows of other lengths, or not rows of 5)
            raise ConfigError(f"{source}: {NAME} of sample {i} must be rows of (class, x1, y1, x2, y2)") from None
        rows.append(np.column_stack([np.full(len(boxes), i), boxes]))
    return from_table(np.concatenate(rows) if rows else np.zeros((0, 6)), len(rows), source)


@dataclass(frozen=True)
class Precision:
    map50_95: float
    map50: float


def mean_average_precision(outputs: dict[str, np.ndarray], truth: np.ndarray) -> Precision:
    """The detections among *outputs* (one array per sample: boxes, their labels and scores, as
    ``device_agent.detections.compare`` finds them; without scores, the detector's own order,
    most confident first) against *truth* (is_truth)."""
    ragged = {name: list(value) for name, value in outputs.items() if value.dtype == object}
    boxes, labels = boxes_and_labels(ragged)
    if boxes is None:
        raise ConfigError(f"the labels are boxes ({NAME}), and the model gives no detections to score against them")
    scores = _scores_of(ragged, boxes)
    hits, confidences, classes = [], [], []
    for i, known in enumerate(truth):
        found = np.asarray(ragged[boxes][i])
        label = np.asarray(ragged[labels][i]) if labels else np.zeros(len(found), np.int64)
        score = np.asarray(ragged[scores][i], np.float64) if scores else -np.arange(len(found), dtype=np.float64)
        hits.append(_matched(corners(found) if len(found) else np.zeros((0, 4)), label, score, known))
        confidences.append(score)
        classes.append(label)
    hits, confidences, classes = np.concatenate(hits), np.concatenate(confidences), np.concatenate(classes)
    counted = np.concatenate([k[:, 0] for k in truth]).astype(np.int64)
    per_class = np.array([_average_precision(hits[classes == c], confidences[classes == c], int((counted == c).sum()))
                          for c in np.unique(counted)])  # [classes, thresholds]
    return Precision(float(per_class.mean()), float(per_class[:, 0].mean()))


def _scores_of(ragged: dict[str, list[np.ndarray]], boxes: str) -> str | None:
    """The output of one float score per box, where there is one."""
    return next((name for name, values in ragged.items() if name != boxes and all(
        np.ndim(v) == 1 and np.asarray(v).dtype.kind == "f" and len(v) == len(b)
        for v, b in zip(values, ragged[boxes]))), None)


def _matched(found: np.ndarray, label: np.ndarray, score: np.ndarray, known: np.ndarray) -> np.ndarray:
    """[detections, thresholds]: whether each detection (corners) matches a box of *known* at each
    IoU threshold, most confident first taking the free box of its class it overlaps most."""
    hit = np.zeros((len(found), len(THRESHOLDS)), bool)
    if not len(found) or not len(known):
        return hit
    overlap = np.where(label[:, None] == known[None, :, 0], iou(found.astype(np.float64), known[:, 1:]), -1.0)
    order = np.argsort(-score, kind="stable")
    for t, threshold in enumerate(THRESHOLDS):
        free = np.ones(len(known), bool)
        for d in order:
            candidates = np.where(free, overlap[d], -1.0)
            best = int(candidates.argmax())
            if candidates[best] >= threshold:
                free[best], hit[d, t] = False, True
    return hit


def _average_precision(hit: np.ndarray, score: np.ndarray, known: int) -> np.ndarray:
    """One class's AP at each threshold: its detections' *hit* rows, their *score*, *known* boxes."""
    order = np.argsort(-score, kind="stable")
    true = np.cumsum(hit[order], axis=0)
    false = np.cumsum(~hit[order], axis=0)
    recall = true / known
    precision = true / np.maximum(true + false, 1)
    out = np.zeros(len(THRESHOLDS))
    for t in range(len(THRESHOLDS)):
        if not len(order):
            break
        envelope = np.maximum.accumulate(precision[::-1, t])[::-1]  # (the best precision at this recall or more)
        at = np.searchsorted(recall[:, t], RECALLS, side="left")
        out[t] = np.where(at < len(envelope), envelope[np.minimum(at, len(envelope) - 1)], 0.0).mean()
    return out
