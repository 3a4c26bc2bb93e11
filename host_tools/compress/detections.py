"""Outputs whose size depends on the input: a detector's boxes, scores and labels after non-maximum
suppression (torchvision's detectors, a YOLO export with NMS), the indices a NonZero finds.

Such an output holds one value per call, with no sample axis, and each sample's may have another
length. Its values over the evaluation data are kept as they are, an object array of one array per
sample (``gathered``), and a compressed model's are compared with the original's row by row by
``device_agent.detections.compare`` (which a device's sample check uses too): where one output is
boxes, the rows are detections, paired with the original's of the same label at IoU ≥ 0.5, most
confident first. Agreement is the share of detections that pair (2 × pairs / (the original's +
the model's), 1 where both found none), averaged over the samples: what the guard's drop is then
read from, as top-1 agreement is for a classifier. Cosine and errors are measured over the paired
rows.
"""

from __future__ import annotations

import numpy as np

from device_agent.detections import as_objects


def per_call(parts: list[np.ndarray], spec, fixed_batch: bool, unbatched: bool) -> bool:
    """Whether an output (*spec*, its values *parts* over the calls) holds no sample axis: each
    call's value is one sample's. So where the inputs take one sample without a batch axis, and
    where one sample per call gives a value whose first axis is not that sample's (not 1)."""
    if unbatched:
        return True
    if not fixed_batch or (spec.shape and spec.shape[0] == 1):
        return False
    return any(np.ndim(p) == 0 or np.shape(p)[0] != 1 for p in parts)


def gathered(parts: list[np.ndarray], spec) -> np.ndarray:
    """One value per sample: stacked where they can only be of one shape (the output's is fixed,
    and they are), else an object array of them."""
    fixed = bool(spec.shape) and all(isinstance(d, int) and d >= 0 for d in spec.shape)
    if fixed and len({p.shape for p in parts}) == 1:
        return np.stack(parts)
    return as_objects(parts)


def is_ragged(value: np.ndarray) -> bool:
    """Whether *value* (an output over the samples, as gathered) is one array per sample."""
    return value.dtype == object
