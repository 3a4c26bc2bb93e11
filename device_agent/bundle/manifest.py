"""The bundle manifest: what a bundle holds and what its model promises.

The manifest is the signed part of a bundle. Its JSON encoding is canonical
(sorted keys, no insignificant white space), so the bytes a host signs are the
bytes a device verifies.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from device_agent.errors import ManifestError
from device_agent.protocol.codec import is_number

FORMAT_VERSION = 1
RUNTIMES = ("onnxruntime", "tflite")
# (str: class names, as a classifier trained on names gives them)
DTYPES = ("float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool", "str")
_SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]
    dtype: str


@dataclass(frozen=True)
class SampleCheck:
    """A sample input with its expected output, and how close a device must come."""

    file: str
    atol: float = 1e-3
    rtol: float = 1e-3
    # Median latency of the sample input the device must meet before it commits; None: no budget.
    latency_budget_ms: float | None = None


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    runtime: str
    model_file: str
    files: tuple[FileEntry, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    sample: SampleCheck
    created_at: str
    compression: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    # Anti-rollback: releases of one model name only go up; a device refuses a lower one than it
    # has committed unless a signed command allows the downgrade. None: compare versions instead.
    release: int | None = None
    expires_at: float | None = None  # Unix time after which devices refuse the bundle
    # What the bundle needs: {"arch": [...], "min_ram_mb": n, "accelerator": "cuda"}; empty: anything.
    target: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def label(self) -> str:
        return f"{self.name} {self.version}"

    @property
    def unpacked_size(self) -> int:
        """Bytes the bundle's files take on a device once unpacked."""
        return sum(f.size for f in self.files)

    def file(self, path: str) -> FileEntry:
        for entry in self.files:
            if entry.path == path:
                return entry
        raise ManifestError(f"manifest lists no file {path!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Manifest":
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise ManifestError(f"manifest is not valid JSON: {exc}") from None
        return cls.from_dict(doc)

    @classmethod
    def from_dict(cls, doc: Any) -> "Manifest":
        if not isinstance(doc, dict):
            raise ManifestError("manifest must be a JSON object")
        if doc.get("format_version") != FORMAT_VERSION:
            raise ManifestError(f"unsupported manifest format_version {doc.get('format_version')!r} "
                                f"(this agent reads {FORMAT_VERSION})")
        try:
            return cls(
                name=doc["name"], version=doc["version"], runtime=doc["runtime"],
                model_file=doc["model_file"],
                files=tuple(FileEntry(f["path"], f["size"], f["sha256"]) for f in doc["files"]),
                inputs=tuple(_tensor(t) for t in doc["inputs"]),
                outputs=tuple(_tensor(t) for t in doc["outputs"]),
                sample=SampleCheck(**doc["sample"]),
                created_at=doc["created_at"],
                compression=doc.get("compression", {}),
                metrics=doc.get("metrics", {}),
                release=doc.get("release"), expires_at=doc.get("expires_at"), target=doc.get("target", {}),
            )
        except (KeyError, TypeError) as exc:
            raise ManifestError(f"manifest is missing or mistypes a field: {exc}") from None


def _tensor(doc: dict[str, Any]) -> TensorSpec:
    return TensorSpec(name=doc["name"], shape=tuple(doc["shape"]), dtype=doc["dtype"])


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ManifestError(message)


def _validate(m: Manifest) -> None:
    _require(isinstance(m.name, str) and bool(_NAME.match(m.name)),
             f"model name {m.name!r} must be 1-64 lower-case letters, digits, '.', '_' or '-'")
    _require(isinstance(m.version, str) and bool(_SEMVER.match(m.version)),
             f"version {m.version!r} is not a semantic version (MAJOR.MINOR.PATCH)")
    _require(m.runtime in RUNTIMES, f"runtime {m.runtime!r} is not one of {', '.join(RUNTIMES)}")
    _require(len(m.files) > 0, "manifest lists no files")
    paths = set()
    for f in m.files:
        _require(isinstance(f.path, str) and _safe_member_name(f.path), f"unsafe file path {f.path!r}")
        _require(isinstance(f.size, int) and not isinstance(f.size, bool) and f.size >= 0,
                 f"file {f.path!r} has an invalid size")
        _require(isinstance(f.sha256, str) and bool(_SHA256.match(f.sha256)),
                 f"file {f.path!r} has an invalid sha256")
        _require(f.path not in paths, f"file {f.path!r} is listed twice")
        paths.add(f.path)
    _require(m.model_file in paths, f"model file {m.model_file!r} is not among the bundle's files")
    _require(m.sample.file in paths, f"sample file {m.sample.file!r} is not among the bundle's files")
    for kind, specs in (("input", m.inputs), ("output", m.outputs)):
        _require(len(specs) > 0, f"manifest declares no {kind}s")
        for spec in specs:
            _require(isinstance(spec.name, str) and spec.name != "", f"an {kind} has no name")
            _require(spec.dtype in DTYPES, f"{kind} {spec.name!r} has unsupported dtype {spec.dtype!r}")
            _require(all(isinstance(d, (int, str)) and not isinstance(d, bool) for d in spec.shape),
                     f"{kind} {spec.name!r} has an invalid shape")
    _require(all(is_number(x) and x >= 0 for x in (m.sample.atol, m.sample.rtol)),
             "sample tolerances must be non-negative numbers")
    budget = m.sample.latency_budget_ms
    _require(budget is None or (is_number(budget) and budget > 0),
             "the latency budget must be a positive number of milliseconds")
    _require(isinstance(m.compression, dict) and isinstance(m.metrics, dict),
             "compression and metrics must be objects")
    _require(m.release is None or (isinstance(m.release, int) and not isinstance(m.release, bool) and m.release >= 0),
             "release must be a non-negative integer")
    _require(m.expires_at is None or is_number(m.expires_at), "expires_at must be a Unix time")  # (NaN: never)
    validate_target(m.target)


TARGET_KEYS = {"arch": list, "min_ram_mb": int, "accelerator": str}


def validate_target(target: Any) -> None:
    """A target is {"arch": [names], "min_ram_mb": int, "accelerator": str}, each part optional."""
    _require(isinstance(target, dict), "target must be an object")
    for key, value in target.items():
        kind = TARGET_KEYS.get(key)
        _require(kind is not None, f"unknown target field {key!r}")
        _require(isinstance(value, kind) and not isinstance(value, bool), f"target field {key!r} has the wrong type")
    _require(all(isinstance(a, str) for a in target.get("arch", [])), "target arch must be a list of names")


def _safe_member_name(path: str) -> bool:
    parts = path.split("/")
    return (path != "" and not path.startswith("/") and "\\" not in path
            and all(p not in ("", ".", "..") for p in parts))
