"""Build a signed, versioned bundle from a model file."""

from __future__ import annotations

import datetime as dt
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from device_agent.arrays import in_width_of
from device_agent.bundle import FileEntry, Manifest, SampleCheck, sha256_file, write_bundle
from device_agent.bundle.signing import load_private_key, sign
from device_agent.errors import ConfigError
from device_agent.runtime import load_runtime
from device_agent.sample import save_sample
from host_tools.compress.model import external_data

SAMPLE_FILE = "sample.npz"
_RUNTIME_BY_SUFFIX = {".onnx": "onnxruntime", ".tflite": "tflite"}


def runtime_for(model: Path) -> str:
    try:
        return _RUNTIME_BY_SUFFIX[model.suffix.lower()]
    except KeyError:
        raise ConfigError(f"{model.name}: unknown model type (expected .onnx or .tflite)") from None


def sample_inputs(runtime, given: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """The sample input: the one given, or a fixed-seed random one shaped like the model's inputs
    (dynamic dimensions as 1). A model of one input takes a file of one array whatever its name,
    as `edgefleet compress` takes data (a TFLite input's name is the converter's, e.g.
    "serving_default_input_2:0"), in the width the model takes (float32 samples for a float16
    model)."""
    if given is not None:
        if len(runtime.inputs) == 1 and len(given) == 1:
            given = {runtime.inputs[0].name: next(iter(given.values()))}
        missing = [s.name for s in runtime.inputs if s.name not in given]
        if missing:
            raise ConfigError(f"sample file lacks input(s) {', '.join(missing)}")
        feeds = {s.name: in_width_of(np.asarray(given[s.name]), s.dtype) for s in runtime.inputs}
        wrong = [f"{s.name!r} is {s.dtype} in the model, {np.asarray(given[s.name]).dtype.name} in the file"
                 for s in runtime.inputs if feeds[s.name] is None]
        if wrong:
            raise ConfigError(f"sample input {wrong[0]}")
        return feeds
    rng = np.random.default_rng(0)
    feeds = {}
    for spec in runtime.inputs:
        shape = tuple(d if isinstance(d, int) and d > 0 else 1 for d in spec.shape)
        if spec.dtype.startswith("float"):
            feeds[spec.name] = rng.random(shape).astype(spec.dtype)
        else:
            feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)
    return feeds


def build_bundle(model: Path, *, name: str, version: str, key: Path, out: Path,
                 sample: Mapping[str, np.ndarray] | None = None, atol: float = 1e-3, rtol: float = 1e-3,
                 latency_budget_ms: float | None = None, release: int | None = None,
                 expires_at: float | None = None, target: dict[str, Any] | None = None,
                 compression: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None,
                 compress: bool = True) -> Manifest:
    """Package *model* with a sample check into a bundle signed by *key*; returns its manifest.
    With *compress*, files that zstd makes smaller are stored compressed (see write_bundle)."""
    model = Path(model)
    if not model.is_file():
        raise ConfigError(f"model file {model} does not exist")
    runtime_name = runtime_for(model)
    private_key = load_private_key(key)
    runtime = load_runtime(runtime_name, model)
    feeds = sample_inputs(runtime, sample)
    expected = runtime.run(feeds)
    broken = [k for k, v in expected.items() if np.asarray(v).dtype.kind in "fc" and np.isnan(v).any()]
    if broken:  # NaN equals nothing, itself included: the check would fail on every device, every time
        raise ConfigError(f"the model's output {', '.join(map(repr, broken))} on the sample input is NaN, so every "
                          f"device's health check would fail; give a --sample the model computes numbers for")
    with tempfile.TemporaryDirectory(prefix="edgefleet-bundle-") as tmp:
        sample_path = Path(tmp) / SAMPLE_FILE
        save_sample(sample_path, feeds, expected)
        # (an ONNX model's external weight files go too, under the names it reads them by)
        extra = external_data(model) if runtime_name == "onnxruntime" else {}
        sources = {model.name: model, **extra, SAMPLE_FILE: sample_path}
        manifest = Manifest(
            name=name, version=version, runtime=runtime_name, model_file=model.name,
            files=tuple(FileEntry(p, src.stat().st_size, sha256_file(src)) for p, src in sources.items()),
            inputs=runtime.inputs, outputs=runtime.outputs,
            sample=SampleCheck(SAMPLE_FILE, atol=atol, rtol=rtol, latency_budget_ms=latency_budget_ms),
            created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            compression=compression or {}, metrics=metrics or {},
            release=release, expires_at=expires_at, target=target or {},
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        write_bundle(out, manifest, sign(private_key, manifest.to_json()), sources, compress=compress)
    return manifest
