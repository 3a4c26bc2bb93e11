"""How a compressed model is compared with its original: fidelity and host latency.

Fidelity is measured output against output on the evaluation data: top-1 agreement and task
accuracy (with labels) for classifier outputs, cosine similarity and max/mean absolute error
for every output; a detector's accuracy, where its labels are boxes, is its mAP50-95 (``truth``).
Latency is measured for all models in the same interleaved rounds, so a noisy, shared machine
slows each of them alike and the ratios stay honest.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace

import numpy as np

from device_agent.detections import compare as compare_detections
from device_agent.detections import unpadded
from device_agent.errors import ConfigError, ModelError
from host_tools.compress import detections, truth
from host_tools.compress.data import BoundData, Dataset
from host_tools.compress.model import ModelFile


@dataclass(frozen=True)
class Fidelity:
    accuracy: float | None  # task accuracy on labelled data, 0..1
    agreement: float | None  # top-1 agreement with the original, 0..1 (classifier outputs)
    cosine: float  # worst output's mean per-sample cosine similarity to the original
    max_abs_error: float
    mean_abs_error: float
    map50: float | None = None  # a detector's on labelled boxes, beside its mAP50-95 (accuracy)

    def as_dict(self) -> dict:
        # six significant digits, not decimals: a model whose outputs are ~1e-9 (random weights, a
        # regression target in small units) has errors that six decimals would write as 0.0
        return {k: None if v is None else float(f"{float(v):.6g}") for k, v in asdict(self).items()
                if k != "map50" or v is not None}


@dataclass(frozen=True)
class Latency:
    p50_ms: float
    p90_ms: float
    runs: int

    def as_dict(self) -> dict:
        return {"p50_ms": round(self.p50_ms, 4), "p90_ms": round(self.p90_ms, 4), "runs": self.runs}


def bind(data: Dataset, runtime) -> BoundData:
    """*data* as feeds for a loaded model (ModelFile.load): in batches where its inputs have a batch
    axis, one sample per call where they are [1, …] — or where the graph runs one sample only, though
    its inputs declare a batch axis (torch.export bakes the batch of its example, 1, into the graph's
    shapes): tried on two samples. A model that does not run one sample either fails here."""
    return probed(data.bind(runtime.inputs, runtime.outputs), runtime, data.source)


def probed(bound: BoundData, runtime, source: str) -> BoundData:
    """*bound* (the data from *source* bound to the model's inputs by their specs) as the model,
    *runtime*, runs it: what bind learns by running it on the first samples."""
    if not bound.fixed_batch and len(bound) >= 2:
        try:
            runtime.run(bound.sample(0, 2))
        except ModelError:
            runtime.run(bound.sample(0))
            bound = replace(bound, fixed_batch=True, batch_axis_unused=True)
    if bound.labels is not None and np.asarray(bound.labels).dtype.kind in "UO" and not truth.is_truth(bound.labels):
        runtime.run(bound.sample(0))  # (the runtime learns a ZipMap's class labels as it runs)
        bound = replace(bound, labels=_indices_of_names(bound.labels, runtime, source))
    return bound


def _indices_of_names(labels, runtime, source: str) -> np.ndarray:
    """Labels that are class names (a scikit-learn classifier trained on them) as the indices of the
    model's score columns, by the class labels its ZipMap output carries; a name the model does not
    have is IGNORED. Without such an output, or where no name is one of the model's, refused."""
    classes = next(iter(getattr(runtime, "classes", {}).values()), None)
    names = np.asarray(labels).astype(str)
    if classes is None:
        raise ConfigError(f"{source}: labels are names ({', '.join(sorted(set(names))[:3])}…), and the model gives "
                          "no class names to match them to: give class indices")
    index = {str(c): i for i, c in enumerate(classes)}
    indices = np.array([index.get(n, IGNORED) for n in names.ravel()], np.int64).reshape(names.shape)
    if names.size and (indices == IGNORED).all():
        raise ConfigError(f"{source}: no label names one of the model's classes ({', '.join(map(str, classes[:5]))})")
    return indices


def outputs_on(runtime, data: BoundData) -> dict[str, np.ndarray]:
    """Every output of a loaded model (ModelFile.load) over all of *data*, samples along axis 0;
    one whose size depends on the input (detections), an object array of each sample's value, as
    are the detections of a TFLite detector whose post-processing pads them (its count goes)."""
    parts: dict[str, list[np.ndarray]] = {o.name: [] for o in runtime.outputs}
    for feeds in data.batches():
        for name, value in data.samples_first(runtime.run(feeds)).items():
            parts[name].append(np.asarray(value))
    specs = {o.name: o for o in runtime.outputs}
    outputs = {name: detections.gathered(values, specs[name])
               if detections.per_call(values, specs[name], data.fixed_batch, bool(data.unbatched))
               else np.concatenate(values) for name, values in parts.items()}
    padded = getattr(runtime, "padded_detections", None)
    return unpadded(outputs, padded) if padded else outputs


def class_axis(output: np.ndarray, model_format: str) -> int | None:
    """The axis of a model output's class scores, or None where it holds none (not float, one axis,
    or one class): the last ([N, classes], [N, tokens, vocabulary], a TFLite segmentation map
    [N, h, w, classes]), except in an ONNX output of four axes or more, which is channels first as
    PyTorch writes it ([N, classes, h, w]: a U-Net's or SegFormer's map, scored per pixel)."""
    if output.dtype.kind != "f" or output.ndim < 2:
        return None
    axis = 1 if model_format == "onnx" and output.ndim >= 4 else output.ndim - 1
    return axis if output.shape[axis] >= 2 else None


IGNORED = -100  # a label that names no class, as PyTorch's cross-entropy takes it


def class_labels(labels: np.ndarray | None, output: np.ndarray, model_format: str) -> np.ndarray | None:
    """*labels* as class indices shaped like *output*'s predictions (int64), or None where there are
    none or they do not fit. One-hot (or probability) rows are read as their class; rows that are not a
    distribution (regression targets) are not. A label outside
    the output's classes becomes IGNORED and is not scored: 255 and -100 are how segmentation and
    token-classification data mark what to ignore. Labels that cannot be class indices at all
    (text, fractions), or of which none names a class, would score every model 0 %, and the guard,
    measuring the drop between two zeros, would pass any model: refused."""
    axis = class_axis(output, model_format)
    if labels is None or axis is None or truth.is_truth(labels):
        return None
    labels, classes = np.asarray(labels), output.shape[axis]
    if labels.shape == output.shape and labels.dtype.kind in "biuf" and labels.size and labels.min() >= 0 \
            and np.allclose(labels.sum(axis=axis), 1, atol=1e-3):  # rows of a distribution, not regression targets
        labels = labels.argmax(axis=axis)
    if labels.shape != output.shape[:axis] + output.shape[axis + 1:]:
        return None
    if labels.dtype.kind not in "biuf" or (labels.dtype.kind == "f" and not np.all(labels == np.round(labels))):
        raise ConfigError(f"labels must be class indices (whole numbers from 0 to {classes - 1}), "
                          f"not {labels.dtype.name} values")
    scored = (labels >= 0) & (labels < classes)
    if labels.size and not scored.any():
        raise ConfigError(f"no label names one of the model's {classes} classes (0 to {classes - 1}): they run "
                          f"from {labels.min():g} to {labels.max():g}")
    return np.where(scored, labels, IGNORED).astype(np.int64)


def box_outputs(outputs: Mapping) -> set:
    """The keys of the outputs that hold boxes beside another's class scores, as a detector's raw head
    gives them (an SSD's or RetinaNet's, before decoding): floats [N, anchors, 4] where another output
    is [N, anchors, C] floats, C not 4. Their last axis is coordinates, not 4 classes: they are
    compared, and trained, as values."""
    shapes = {key: np.shape(value) for key, value in outputs.items()
              if getattr(value, "dtype", None) is not None and value.dtype.kind == "f"}
    return {key for key, shape in shapes.items() if len(shape) >= 3 and shape[-1] == 4
            and any(other != key and len(s) == len(shape) and s[:-1] == shape[:-1] and s[-1] != 4
                    for other, s in shapes.items())}


def scores_output(outputs: dict[str, np.ndarray], model_format: str) -> str:
    """The name of the output that holds class scores: the first, or where the first holds none (a
    scikit-learn classifier's predicted label, before its probabilities; a raw detection head's
    boxes, box_outputs), the first that does."""
    boxes = box_outputs(outputs)
    kept = [name for name in outputs if name not in boxes]  # (never empty: boxes sit beside another)
    return next((name for name in kept if class_axis(outputs[name], model_format) is not None), kept[0])


def accuracy(outputs: dict[str, np.ndarray], labels: np.ndarray | None, model_format: str) -> float | None:
    first = outputs[scores_output(outputs, model_format)]
    indices = class_labels(labels, first, model_format)
    if indices is None:
        return None
    scored = indices != IGNORED
    predictions = first.argmax(axis=class_axis(first, model_format))
    return float((predictions[scored] == indices[scored]).mean())


def fidelity(reference: dict[str, np.ndarray], outputs: dict[str, np.ndarray],
             labels: np.ndarray | None, model_format: str, scored: dict[str, np.ndarray] | None = None) -> Fidelity:
    """*outputs* against *reference*, the original's; accuracy on *labels*, of *scored* where the
    model's outputs are read otherwise for it (a YOLO's detections at `yolo val`'s threshold)."""
    missing = set(reference) - set(outputs)
    if missing:
        raise ModelError(f"the compressed model lacks output(s) {', '.join(sorted(missing))}")
    cosines, max_errors, mean_errors = [], [], []
    ragged = [name for name, ref in reference.items()
              if detections.is_ragged(ref) or detections.is_ragged(outputs[name])]
    for name, ref in reference.items():
        out = outputs[name]
        if name in ragged:
            continue
        if out.shape != ref.shape:
            raise ModelError(f"output {name!r} changed shape: {list(ref.shape)} -> {list(out.shape)}")
        if ref.dtype.kind not in "biufc":  # (class names: the share of samples that give the same ones)
            cosines.append(float(np.all(ref.reshape(len(ref), -1) == out.reshape(len(out), -1), axis=1).mean()))
            continue
        a = ref.reshape(len(ref), -1).astype(np.float64)
        b = out.reshape(len(out), -1).astype(np.float64)
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        same = np.all(a == b, axis=1)
        cos = np.where(norms > 0, (a * b).sum(axis=1) / np.where(norms > 0, norms, 1), np.where(same, 1.0, 0.0))
        cosines.append(float(cos.mean()))
        diff = np.abs(a - b)
        max_errors.append(float(diff.max()) if diff.size else 0.0)
        mean_errors.append(float(diff.mean()) if diff.size else 0.0)
    first = scores_output(reference, model_format)
    agreement, axis = None, class_axis(reference[first], model_format)
    rows = compare_detections({name: reference[name] for name in ragged}, outputs) if ragged else None
    # (beside detections, a map with channels is not class scores: a YOLO segmenter's prototype
    # masks, which its detections' coefficients weigh; it is compared as values)
    if axis is not None and first not in ragged and not (rows and rows.by_detection):
        agreement = float((reference[first].argmax(axis=axis) == outputs[first].argmax(axis=axis)).mean())
    if rows:  # (detections: how many pair up with the original's is their agreement)
        agreement = rows.agreement if agreement is None else min(agreement, rows.agreement)
        cosines.append(rows.cosine)
        max_errors.append(rows.max_abs_error)
        mean_errors.append(rows.mean_abs_error)
    errors = (min(cosines), max(max_errors, default=0.0), float(np.mean(mean_errors)) if mean_errors else 0.0)
    if truth.is_truth(labels):
        precision = truth.mean_average_precision(outputs if scored is None else scored, labels)
        return Fidelity(precision.map50_95, agreement, *errors, map50=precision.map50)
    return Fidelity(accuracy(outputs, labels, model_format), agreement, *errors)


def latencies(models: list[ModelFile], data: BoundData, *, runs: int = 200, rounds: int | None = None,
              threads: int | None = 1, warmup: int = 10, batch: int = 1) -> list[Latency]:
    """Latency of each model on calls of *batch* samples (default: single-sample calls), measured
    in interleaved rounds (default: one per 10 runs) of runs/rounds calls each on the same inputs;
    p50 and p90 over all of a model's calls. Many short rounds spread a busy spell on a shared
    machine over every model alike."""
    if batch > 1 and data.fixed_batch:
        raise ConfigError("the model takes one sample per call: no batched latency")
    rounds = rounds or max(5, runs // 10)
    runtimes = [m.load(threads=threads) for m in models]
    starts = max(1, len(data) - batch + 1)
    samples = [data.sample(i * batch % starts, batch) for i in range(max(runs // rounds, 1))]
    for runtime in runtimes:
        for i in range(warmup):
            runtime.run(samples[i % len(samples)])
    times: list[list[float]] = [[] for _ in runtimes]
    for _ in range(rounds):
        for runtime, bucket in zip(runtimes, times):
            for feeds in samples:
                start = time.perf_counter()
                runtime.run(feeds)
                bucket.append(time.perf_counter() - start)
    return [Latency(float(np.percentile(t, 50)) * 1e3, float(np.percentile(t, 90)) * 1e3, len(t)) for t in times]

