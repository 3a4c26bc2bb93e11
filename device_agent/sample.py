"""A bundle's sample input and expected output, and the check a device runs on it.

Stored in the bundle as one ``.npz`` whose arrays are named ``input.<tensor>``
and ``output.<tensor>``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping

import numpy as np

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


def check_sample(runtime: ModelRuntime, manifest: Manifest, bundle_dir: Path) -> dict[str, np.ndarray]:
    """Run the sample input and compare with the expected output within the manifest's tolerance."""
    inputs, expected = load_sample(bundle_dir / manifest.sample.file)
    got = runtime.run(inputs)
    for name, want in expected.items():
        if name not in got:
            raise HealthCheckError(f"model gives no output {name!r}")
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
