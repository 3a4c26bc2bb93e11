"""A bundle's sample input and expected output, and the check a device runs on it.

Stored in the bundle as one ``.npz`` whose arrays are named ``input.<tensor>``
and ``output.<tensor>``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping

import numpy as np

from device_agent import detections
from device_agent.arrays import read_npz
from device_agent.bundle.manifest import Manifest
from device_agent.errors import UNREADABLE_ARRAYS, HealthCheckError, ModelError
from device_agent.runtime import ModelRuntime


def save_sample(path: Path, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
    arrays = {f"input.{k}": v for k, v in inputs.items()}
    arrays.update({f"output.{k}": v for k, v in outputs.items()})
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    Path(path).write_bytes(buf.getvalue())


def load_sample(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    try:
        arrays = read_npz(path)
    except UNREADABLE_ARRAYS as exc:
        raise ModelError(f"cannot read sample file {Path(path).name}: {exc}") from None
    inputs = {k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith("input.")}
    outputs = {k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith("output.")}
    return inputs, outputs


# Detections whose number differs from the sample's: the share of boxes that must pair with the
# expected ones (IoU >= 0.5, the same label), each pair within the tolerance.
MIN_PAIRED = 0.9


def check_sample(runtime: ModelRuntime, manifest: Manifest, bundle_dir: Path) -> dict[str, np.ndarray]:
    """Run the sample input and compare with the expected output within the manifest's tolerance.
    A detector's boxes, scores and labels, where the model finds another number of boxes than the
    sample holds (a device's rounding, or TensorRT's, moves a box across a score threshold), are
    compared box by box instead (device_agent.detections): MIN_PAIRED of them must pair. So are a
    TFLite detector's, whose post-processing op pads them to a fixed number of rows: only the rows
    it counts as detections are compared."""
    inputs, expected = load_sample(bundle_dir / manifest.sample.file)
    got = runtime.run(inputs)
    padded = getattr(runtime, "padded_detections", None)
    if padded and set(padded) <= set(expected) & set(got):  # (TFLite's post-processing: its rows, unpadded)
        expected, got = _detections_of(expected, padded), _detections_of(got, padded)
        counted = set(padded[:3]) if len(got[padded[0]]) != len(expected[padded[0]]) else set()
    else:
        counted = _counted(runtime, expected, got)
    if counted:
        _check_detections({n: expected[n] for n in counted}, {n: got[n] for n in counted}, manifest)
    for name, want in expected.items():
        if name not in got:
            raise HealthCheckError(f"model gives no output {name!r}")
        if name in counted:
            continue
        have = got[name]
        if have.shape != want.shape:
            raise HealthCheckError(f"output {name!r} has shape {have.shape}, expected {want.shape}")
        if want.dtype.kind not in "biufc":  # (class names: equal, not close)
            if not np.array_equal(have, want):
                raise HealthCheckError(f"output {name!r} differs from the expected sample output "
                                       f"({have.ravel()[:3].tolist()} where {want.ravel()[:3].tolist()} was expected)")
            continue
        if not np.allclose(have, want, atol=manifest.sample.atol, rtol=manifest.sample.rtol):
            worst = float(np.max(np.abs(have.astype(np.float64) - want.astype(np.float64))))
            raise HealthCheckError(f"output {name!r} differs from the expected sample output "
                                   f"(max abs error {worst:.3g}, atol {manifest.sample.atol:g})")
    return inputs


def _detections_of(outputs: dict[str, np.ndarray], padded: tuple[str, ...]) -> dict[str, np.ndarray]:
    """One sample's *outputs* with the padded detections cut to the rows that are detections."""
    return {name: value[0] if name in padded else value
            for name, value in detections.unpadded(outputs, padded).items()}


def _counted(runtime: ModelRuntime, expected: dict, got: dict) -> set[str]:
    """The outputs whose first axis counts what the model found (declared with a size of its own,
    not an input's batch), where their sizes differ from the sample's and one of them holds boxes
    ([n, 4] floats); else none, and every output is checked as it is."""
    batch = {d for spec in runtime.inputs for d in spec.shape if isinstance(d, str)}
    counted = {spec.name for spec in runtime.outputs if spec.name in expected and spec.name in got and spec.shape
               and isinstance(spec.shape[0], str) and spec.shape[0] not in batch}
    boxes = any(detections.is_boxes(expected[n]) for n in counted)
    moved = any(got[n].shape != expected[n].shape for n in counted)
    return counted if boxes and moved else set()


def _check_detections(want: dict[str, np.ndarray], have: dict[str, np.ndarray], manifest: Manifest) -> None:
    rows = detections.compare({n: detections.as_objects([v]) for n, v in want.items()},
                              {n: detections.as_objects([v]) for n, v in have.items()})
    boxes = next(n for n, v in want.items() if detections.is_boxes(v))
    found = f"the model found {len(have[boxes])} boxes ({boxes!r}) where the sample expects {len(want[boxes])}"
    if rows.agreement < MIN_PAIRED:
        raise HealthCheckError(f"{found}, and {rows.agreement:.0%} of them pair with the expected ones (IoU >= "
                               f"{detections.IOU}, the same label; {MIN_PAIRED:.0%} must)")
    largest = max((float(np.abs(v).max()) for v in want.values() if v.size and v.dtype.kind in "biuf"), default=0.0)
    if rows.max_abs_error > manifest.sample.atol + manifest.sample.rtol * largest:
        raise HealthCheckError(f"{found}; those that pair differ from the expected (max abs error "
                               f"{rows.max_abs_error:.3g}, atol {manifest.sample.atol:g})")
