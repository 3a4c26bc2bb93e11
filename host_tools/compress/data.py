"""Calibration and evaluation inputs: from an ``.npz``, a folder of ``.npy``/``.npz`` files, or a loader.

What a source may be:

- ``data.npz``: one array per model input, named after it, samples along the first axis
  (a single-input model may call it anything, e.g. ``x``); labels, if any, in ``y`` or ``labels``,
  or a detector's ground-truth boxes in ``label_boxes`` (``truth``).
- a folder: one sample per ``.npy`` file (single-input models) or per ``.npz`` file (one array
  per input), in file-name order; labels, if any, in ``labels.npy`` (or ``label_boxes.npy``) in
  the same folder.
- ``loader.py`` (a file defining ``load()``) or ``package.module:function``: returns what an
  ``.npz`` holds (a dict of arrays), or an iterable of samples (arrays or dicts of arrays),
  optionally as a pair ``(inputs, labels)``, or an iterable of ``(sample, label)`` pairs (what
  iterating over a PyTorch Dataset gives).

Arrays are matched to the model's inputs when a pass or the evaluation binds them, so one
file serves any model that takes the same inputs. An input whose batch is not its first axis (a
recurrent state [layers, batch, hidden], named so by torch.onnx.export's dynamic axes) has its
samples along the first axis here too: [samples, layers, hidden]. An input with no batch axis at
all (a torchvision detector's image [3, H, W]) has its samples along a new first axis,
[samples, 3, H, W], and is given them one at a time.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from device_agent.arrays import in_width_of, read_npy, read_npz
from device_agent.errors import UNREADABLE_ARRAYS, ConfigError
from host_tools.compress import truth

LABEL_NAMES = ("y", "labels")


@dataclass(frozen=True)
class Dataset:
    arrays: Mapping[str, np.ndarray]  # name -> samples along axis 0
    labels: np.ndarray | None
    source: str

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def head(self, count: int) -> "Dataset":
        return Dataset({k: v[:count] for k, v in self.arrays.items()},
                       None if self.labels is None else self.labels[:count], self.source)

    def bind(self, specs: Sequence, outputs: Sequence = ()) -> "BoundData":
        """These arrays as feeds for a model whose inputs are *specs* (TensorSpec-like, as are its
        *outputs*, whose batch axes the BoundData then knows too)."""
        arrays = dict(self.arrays)
        if len(specs) == 1 and specs[0].name not in arrays:
            if len(arrays) != 1:
                raise ConfigError(f"{self.source}: the model's input is {specs[0].name!r}; the data has "
                                  f"{', '.join(sorted(arrays))}: name one array after the input")
            arrays = {specs[0].name: next(iter(arrays.values()))}
        missing = [s.name for s in specs if s.name not in arrays]
        if missing:
            raise ConfigError(f"{self.source}: no data for model input(s) {', '.join(missing)} "
                              f"(the data has {', '.join(sorted(arrays))})")
        axes = batch_axes([*specs, *outputs], specs)
        unbatched = frozenset(s.name for s in specs if _unbatched(arrays[s.name], s, axes.get(s.name, 0)))
        feeds = {s.name: _conform(arrays[s.name], s, self.source, axes.get(s.name, 0), s.name in unbatched)
                 for s in specs}
        fixed = bool(unbatched) or any(s.shape and s.shape[axes.get(s.name, 0)] == 1 for s in specs)
        return BoundData(feeds, self.labels, fixed_batch=fixed, axes=axes, unbatched=unbatched)


def batch_axes(specs: Sequence, inputs: Sequence) -> dict[str, int]:
    """Which of *specs* (a model's tensors, TensorSpec-like) hold their batch along an axis other
    than the first, and that axis: the one dimension named as the first of the model's *inputs*,
    in a tensor whose first dimension is fixed. torch.onnx.export writes a recurrent layer's state
    so: [layers, "batch", hidden] beside frames ["batch", time, features]."""
    names = {s.shape[0] for s in inputs if s.shape and isinstance(s.shape[0], str) and s.shape[0] != "?"}
    axes = {}
    for spec in specs:
        found = [i for i, d in enumerate(spec.shape) if d in names]
        if spec.shape and isinstance(spec.shape[0], int) and len(found) == 1:
            axes[spec.name] = found[0]
    return axes


@dataclass(frozen=True)
class BoundData:
    feeds: dict[str, np.ndarray]  # every input's samples along axis 0
    labels: np.ndarray | None
    fixed_batch: bool  # the model takes exactly one sample per call
    batch_axis_unused: bool = False  # … though its inputs declare a batch axis (found by evaluate.bind)
    axes: Mapping[str, int] = field(default_factory=dict)  # tensors batched along another axis (batch_axes)
    unbatched: frozenset[str] = frozenset()  # inputs that take one sample with no batch axis at all

    def __len__(self) -> int:
        return len(next(iter(self.feeds.values())))

    def head(self, count: int) -> "BoundData":
        return replace(self, feeds={k: v[:count] for k, v in self.feeds.items()},
                       labels=None if self.labels is None else self.labels[:count])

    def sample(self, index: int, size: int = 1) -> dict[str, np.ndarray]:
        """Feeds of *size* samples from *index* (one sample: a batch of 1), as the model takes them."""
        return self.as_model_takes({k: v[index:index + size] for k, v in self.feeds.items()})

    def batches(self, size: int = 64) -> Iterator[dict[str, np.ndarray]]:
        step = 1 if self.fixed_batch else size
        for start in range(0, len(self), step):
            yield self.as_model_takes({k: v[start:start + step] for k, v in self.feeds.items()})

    def as_model_takes(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """*tensors* (samples along axis 0) with each batch where the model holds it (an input that
        takes one sample without a batch axis: that sample)."""
        return {k: v[0] if k in self.unbatched else
                np.ascontiguousarray(np.moveaxis(v, 0, self.axes[k])) if k in self.axes else v
                for k, v in tensors.items()}

    def samples_first(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The model's *tensors* (its outputs, say) with each one's samples along axis 0."""
        return {k: np.moveaxis(v, self.axes[k], 0) if k in self.axes else v for k, v in tensors.items()}


def _unbatched(array, spec, axis: int) -> bool:
    """Whether *array* holds samples of an input that takes one sample with no batch axis (a
    torchvision detector's image [3, H, W]): each of its samples has the input's whole shape, one
    axis more than the input has, and they are not samples saved with a batch axis of 1."""
    shape, rank = np.shape(array), len(spec.shape)
    if not rank or len(shape) != rank + 1 or shape[axis + 1] == 1:
        return False
    return all(not isinstance(want, int) or want <= 0 or want == have for want, have in zip(spec.shape, shape[1:]))


def _conform(array: np.ndarray, spec, source: str, axis: int = 0, unbatched: bool = False) -> np.ndarray:
    """*array*: samples of input *spec* along its first axis, the model's batch along *axis* (or,
    *unbatched*, each sample the whole input, as _unbatched found)."""
    array = np.asarray(array)
    if not unbatched:
        array = _without_own_batch(array, spec, axis)
        _check_shape(array, spec, source, axis)
    given, array = array, in_width_of(array, spec.dtype)
    if array is None:
        raise ConfigError(f"{source}: input {spec.name!r} is {spec.dtype} in the model, {given.dtype.name} in the data")
    if array.dtype.kind in "fc" and not np.isfinite(array).all():
        # Calibration would end in ONNX Runtime's "scale issue", evaluation in meaningless scores.
        bad = int((~np.isfinite(array.reshape(len(array), -1))).any(axis=1).sum()) if array.ndim else 1
        raise ConfigError(f"{source}: input {spec.name!r} holds NaN or infinite values in {bad} of "
                          f"{len(array) if array.ndim else 1} samples")
    return np.ascontiguousarray(array)


def _without_own_batch(array: np.ndarray, spec, axis: int) -> np.ndarray:
    rank = len(spec.shape)
    if rank and array.ndim == rank + 1 and array.shape[axis + 1] == 1:
        return np.squeeze(array, axis + 1)  # samples saved with their own batch axis of 1
    return array


def _check_shape(array: np.ndarray, spec, source: str, axis: int) -> None:
    rank = len(spec.shape)
    if rank and array.ndim != rank:
        raise ConfigError(f"{source}: input {spec.name!r} takes rank-{rank} tensors {list(spec.shape)}; "
                          f"the data's samples stack to shape {list(array.shape)}")
    dims = [i for i in range(rank) if i != axis]  # the model's dimensions of one sample
    for i, have in zip(dims, array.shape[1:]):
        want = spec.shape[i]
        if isinstance(want, int) and want > 0 and want != have:
            raise ConfigError(f"{source}: input {spec.name!r} has {want} in dimension {i}, the data {have}"
                              + (f" (its samples go along the first axis; the model's batch is its dimension "
                                 f"{axis})" if axis else ""))


def load_dataset(source: str | Path | Dataset) -> Dataset:
    """Read *source* (see the module docstring); a Dataset passes through."""
    if isinstance(source, Dataset):
        return source
    text = str(source)
    path = Path(text)
    if path.is_dir():
        return _from_folder(path)
    if path.suffix == ".npz":
        if not path.is_file():
            raise ConfigError(f"data file {path} does not exist")
        return _from_arrays(_read_npz(path), text)
    if path.suffix == ".py" or (":" in text and not path.exists()):
        return _from_loader(text)
    if not path.exists():
        raise ConfigError(f"data {text} does not exist")
    raise ConfigError(f"{text}: data must be an .npz, a folder of .npy/.npz files, or a Python loader")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        return read_npz(path)
    except UNREADABLE_ARRAYS as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None


def _read_npy(path: Path) -> np.ndarray:
    try:
        return read_npy(path)
    except UNREADABLE_ARRAYS as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None


def _from_arrays(arrays: dict[str, Any], source: str) -> Dataset:
    boxes = arrays.pop(truth.NAME, None)
    labels = next((_labels(arrays.pop(n), source) for n in LABEL_NAMES if n in arrays), None)
    if boxes is not None and labels is not None:
        raise ConfigError(f"{source}: both labels and {truth.NAME}: give a classifier's labels or a detector's boxes")
    if not arrays:
        raise ConfigError(f"{source}: no input arrays (only labels)")
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    counts = {k: len(v) for k, v in arrays.items() if v.ndim}
    if len(counts) != len(arrays) or len(set(counts.values())) != 1:
        raise ConfigError(f"{source}: every input array needs the same number of samples along its first "
                          f"axis (got {counts}){_moved_batch(arrays, counts)}")
    count = next(iter(counts.values()))
    if count == 0:
        raise ConfigError(f"{source}: no samples")
    if labels is not None and len(labels) != count:
        raise ConfigError(f"{source}: {len(labels)} labels for {count} samples")
    if isinstance(boxes, np.ndarray) and boxes.dtype != object:
        labels = truth.from_table(boxes, count, source)
    elif boxes is not None:  # (a loader's one array per sample)
        if len(boxes) != count:
            raise ConfigError(f"{source}: {truth.NAME} for {len(boxes)} samples, and there are {count}")
        labels = truth.from_samples(boxes, source)
    return Dataset(arrays, labels, source)


def _labels(labels, source: str) -> np.ndarray:
    try:
        return np.asarray(labels)
    except ValueError:  # (numpy refuses a list of arrays of different lengths)
        raise ConfigError(f"{source}: the labels differ in shape from sample to sample; a detector's boxes go in "
                          f"{truth.NAME}, rows of ({truth.COLUMNS})") from None


def _moved_batch(arrays: dict[str, np.ndarray], counts: dict[str, int]) -> str:
    """What to do when one array holds the others' number of samples along another axis, as a
    recurrent state saved the way the model takes it ([layers, batch, hidden]) does."""
    most = max(counts.values(), default=0)  # (a state's layers are fewer than the samples)
    for name, array in arrays.items():
        axis = next((i for i, n in enumerate(array.shape[1:], start=1) if n == most), None)
        if counts.get(name) != most and axis is not None:
            return f"; {name!r} has {most} along axis {axis}: save it as np.moveaxis({name}, {axis}, 0)"
    return ""


def _from_samples(samples: list, labels, source: str, files: list[str] | None = None,
                  extra: Mapping | None = None) -> Dataset:
    """*files*: the name of the file each sample came from (a folder's), for the errors; *extra*:
    what goes beside the samples' arrays (a folder's ground-truth boxes)."""
    if not samples:
        raise ConfigError(f"{source}: no samples")
    if all(isinstance(s, Mapping) for s in samples):
        names = set(samples[0])
        if any(set(s) != names for s in samples):
            raise ConfigError(f"{source}: every sample must have the same inputs")
        arrays = {n: _stack([s[n] for s in samples], source, files, n) for n in names}
    else:
        arrays = {"x": _stack(samples, source, files)}
    return _from_arrays({**arrays, **(extra or {}), **({"labels": labels} if labels is not None else {})}, source)


def _stack(samples: list, source: str, files: list[str] | None = None, name: str | None = None) -> np.ndarray:
    try:
        return np.stack([np.asarray(s) for s in samples])
    except ValueError as exc:
        shapes = [np.shape(s) for s in samples] if files else []
        odd = next((i for i, shape in enumerate(shapes) if shape != shapes[0]), None)
        if odd is None:
            raise ConfigError(f"{source}: samples differ in shape ({exc})") from None
        where = f"{name!r} in " if name else ""
        raise ConfigError(f"{source}: each file holds one sample, so all need the same shape, but {where}"
                          f"{files[0]} is {shapes[0]} and {files[odd]} {shapes[odd]}; for batches of samples, "
                          f"use one .npz or a loader") from None


def _from_folder(folder: Path) -> Dataset:
    labels_file, boxes_file = folder / "labels.npy", folder / f"{truth.NAME}.npy"
    files = sorted(p for p in folder.iterdir() if p.suffix in (".npy", ".npz") and p not in (labels_file, boxes_file))
    if not files:
        raise ConfigError(f"{folder}: no .npy or .npz files")
    if {p.suffix for p in files} != {files[0].suffix}:
        raise ConfigError(f"{folder}: mix of .npy and .npz files; use one kind")
    samples = [_read_npy(p) if p.suffix == ".npy" else _read_npz(p) for p in files]
    labels = _read_npy(labels_file) if labels_file.is_file() else None
    boxes = {truth.NAME: _read_npy(boxes_file)} if boxes_file.is_file() else {}
    return _from_samples(samples, labels, str(folder), files=[p.name for p in files], extra=boxes)


def _from_loader(spec: str) -> Dataset:
    function = _loader_function(spec)
    try:
        result = function()
    except Exception as exc:  # the user's code: any failure is theirs, reported in one line
        raise ConfigError(f"data loader {spec} failed: {type(exc).__name__}: {exc}") from None
    labels = None
    if isinstance(result, tuple) and len(result) == 2:
        result, labels = result
    if isinstance(result, Mapping):
        return _from_arrays({**result, **({"labels": labels} if labels is not None else {})}, spec)
    if isinstance(result, np.ndarray):
        return _from_arrays({"x": result, **({"labels": labels} if labels is not None else {})}, spec)
    try:
        samples = list(result)
    except TypeError:
        raise ConfigError(f"data loader {spec} returned {type(result).__name__}, not arrays or samples") from None
    if labels is None and samples and all(isinstance(s, tuple) and len(s) == 2 for s in samples):
        samples, labels = [s[0] for s in samples], [s[1] for s in samples]  # (sample, label), as a torch Dataset
    return _from_samples(samples, labels, spec)


def _loader_function(spec: str):
    if spec.endswith(".py"):
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"data loader {path} does not exist")
        module_spec = importlib.util.spec_from_file_location(f"edgefleet_loader_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            raise ConfigError(f"cannot import data loader {path}: {type(exc).__name__}: {exc}") from None
        name = "load"
    else:
        module_name, _, name = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(f"cannot import data loader module {module_name}: {exc}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ConfigError(f"data loader {spec} has no function {name}()")
    return function
