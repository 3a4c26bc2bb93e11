"""The messages that cross MQTT, each a small frozen class with one encoding.

JSON messages are UTF-8 objects with a ``type`` field; decoding validates
types and bounds and raises ProtocolError, never KeyError or TypeError, so a
malformed message from the network is logged and dropped, never a crash.
Chunks are binary: a 4-byte big-endian header length, a JSON header, the data.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any

from device_agent.errors import ProtocolError

MAX_JSON_BYTES = 256 * 1024
MAX_CHUNK_SIZE = 1 << 20
DEFAULT_CHUNK_SIZE = 64 * 1024


def _decode(payload: bytes, expected_type: str) -> dict[str, Any]:
    doc = _decode_any(payload)
    if doc.get("type") != expected_type:
        raise ProtocolError(f"expected a {expected_type!r} message")
    return doc


def _get(doc: dict[str, Any], key: str, kind: type | tuple[type, ...], *, optional: bool = False) -> Any:
    value = doc.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ProtocolError(f"field {key!r} has the wrong type")
    if not isinstance(value, kind):
        raise ProtocolError(f"field {key!r} is missing or has the wrong type")
    return value


def _encode(kind: str, body: dict[str, Any]) -> bytes:
    return json.dumps({"type": kind, **body}, separators=(",", ":")).encode()


@dataclass(frozen=True)
class BundleOffer:
    """What a device needs to fetch a bundle: its identity, size and chunking."""

    sha256: str
    size: int
    chunk_size: int
    name: str
    version: str
    # The manifest's target, repeated here so a device can refuse a bundle it cannot run before
    # downloading it (the signed manifest is checked again after the download).
    target: dict[str, Any] | None = None

    @property
    def chunk_count(self) -> int:
        return max(1, -(-self.size // self.chunk_size))

    @classmethod
    def from_dict(cls, doc: Any) -> "BundleOffer":
        if not isinstance(doc, dict):
            raise ProtocolError("bundle offer must be an object")
        offer = cls(sha256=_get(doc, "sha256", str), size=_get(doc, "size", int),
                    chunk_size=_get(doc, "chunk_size", int), name=_get(doc, "name", str),
                    version=_get(doc, "version", str), target=_get(doc, "target", dict, optional=True))
        if len(offer.sha256) != 64 or any(c not in "0123456789abcdef" for c in offer.sha256):
            raise ProtocolError("bundle sha256 must be 64 lower-case hex digits")
        if not 0 < offer.size or not 0 < offer.chunk_size <= MAX_CHUNK_SIZE:
            raise ProtocolError("bundle size and chunk size must be positive (chunk size at most 1 MiB)")
        return offer


@dataclass(frozen=True)
class DeployCommand:
    command_id: str
    bundle: BundleOffer
    issued_at: float
    allow_downgrade: bool = False  # install a lower release than the one committed (signed, so deliberate)

    def to_payload(self) -> bytes:
        return _encode("deploy", {"command_id": self.command_id, "issued_at": self.issued_at,
                                  "bundle": asdict(self.bundle), "allow_downgrade": self.allow_downgrade})

    @classmethod
    def from_payload(cls, payload: bytes) -> "DeployCommand":
        doc = _decode(payload, "deploy")
        return cls(command_id=_get(doc, "command_id", str), issued_at=float(_get(doc, "issued_at", (int, float))),
                   bundle=BundleOffer.from_dict(doc.get("bundle")),
                   allow_downgrade=bool(_get(doc, "allow_downgrade", bool, optional=True)))


@dataclass(frozen=True)
class RollbackCommand:
    """Go back to the newest committed version before the active one."""

    command_id: str
    issued_at: float

    def to_payload(self) -> bytes:
        return _encode("rollback", {"command_id": self.command_id, "issued_at": self.issued_at})

    @classmethod
    def from_payload(cls, payload: bytes) -> "RollbackCommand":
        doc = _decode(payload, "rollback")
        return cls(command_id=_get(doc, "command_id", str), issued_at=float(_get(doc, "issued_at", (int, float))))


@dataclass(frozen=True)
class StatusRequest:
    """Ask a device for an AgentReport on its reply topic."""

    command_id: str
    issued_at: float

    def to_payload(self) -> bytes:
        return _encode("status_request", {"command_id": self.command_id, "issued_at": self.issued_at})

    @classmethod
    def from_payload(cls, payload: bytes) -> "StatusRequest":
        doc = _decode(payload, "status_request")
        return cls(command_id=_get(doc, "command_id", str), issued_at=float(_get(doc, "issued_at", (int, float))))


MAX_BENCH_RUNS = 100_000


@dataclass(frozen=True)
class BenchCommand:
    """Benchmark a bundle on the device (fetched and verified if it is not there); None: the active one."""

    command_id: str
    issued_at: float
    bundle: BundleOffer | None = None
    runs: int = 100
    warmup: int = 10

    def to_payload(self) -> bytes:
        return _encode("bench", {"command_id": self.command_id, "issued_at": self.issued_at,
                                 "bundle": asdict(self.bundle) if self.bundle else None,
                                 "runs": self.runs, "warmup": self.warmup})

    @classmethod
    def from_payload(cls, payload: bytes) -> "BenchCommand":
        doc = _decode(payload, "bench")
        runs, warmup = _get(doc, "runs", int), _get(doc, "warmup", int)
        if not 0 < runs <= MAX_BENCH_RUNS or not 0 <= warmup <= MAX_BENCH_RUNS:
            raise ProtocolError(f"runs must be 1..{MAX_BENCH_RUNS} and warmup 0..{MAX_BENCH_RUNS}")
        bundle = doc.get("bundle")
        return cls(command_id=_get(doc, "command_id", str), issued_at=float(_get(doc, "issued_at", (int, float))),
                   bundle=None if bundle is None else BundleOffer.from_dict(bundle), runs=runs, warmup=warmup)


MAX_TRUST_CHANGES = 16


@dataclass(frozen=True)
class TrustCommand:
    """Change the keys a device trusts: add PEM public keys (rotation: signed by a key the device
    already trusts) and revoke key ids. Applied all or nothing; answered with a Reply."""

    command_id: str
    issued_at: float
    add: tuple[str, ...] = ()
    revoke: tuple[str, ...] = ()

    def to_payload(self) -> bytes:
        return _encode("trust", {"command_id": self.command_id, "issued_at": self.issued_at,
                                 "add": list(self.add), "revoke": list(self.revoke)})

    @classmethod
    def from_payload(cls, payload: bytes) -> "TrustCommand":
        doc = _decode(payload, "trust")
        add, revoke = _get(doc, "add", list), _get(doc, "revoke", list)
        if not all(isinstance(x, str) for x in add + revoke):
            raise ProtocolError("'add' and 'revoke' must be lists of strings")
        if not add and not revoke or len(add) > MAX_TRUST_CHANGES or len(revoke) > MAX_TRUST_CHANGES:
            raise ProtocolError(f"a trust change adds or revokes 1..{MAX_TRUST_CHANGES} keys")
        return cls(command_id=_get(doc, "command_id", str), issued_at=float(_get(doc, "issued_at", (int, float))),
                   add=tuple(add), revoke=tuple(revoke))


@dataclass(frozen=True)
class ConfigCommand:
    """Change settings on a device (the ones listed in ``device_agent.config.REMOTE_SETTINGS``);
    applied all or nothing, kept across restarts, answered with a Reply of the settings in force.
    An empty *settings* asks for them; a value of None returns a setting to the config file's."""

    command_id: str
    issued_at: float
    settings: dict[str, Any]

    def to_payload(self) -> bytes:
        return _encode("config", {"command_id": self.command_id, "issued_at": self.issued_at,
                                  "settings": self.settings})

    @classmethod
    def from_payload(cls, payload: bytes) -> "ConfigCommand":
        doc = _decode(payload, "config")
        settings = _get(doc, "settings", dict)
        if len(settings) > 32 or not all(
                isinstance(k, str) and (v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)))
                for k, v in settings.items()):
            raise ProtocolError("settings must map up to 32 names to numbers (or null)")
        return cls(command_id=_get(doc, "command_id", str), issued_at=float(_get(doc, "issued_at", (int, float))),
                   settings=settings)


COMMANDS = {"deploy": DeployCommand, "rollback": RollbackCommand, "status_request": StatusRequest,
            "bench": BenchCommand, "trust": TrustCommand, "config": ConfigCommand}


def parse_command(payload: bytes, keys=None):
    """Decode any host -> device command by its ``type``; with *keys*, it must be signed by one
    of them and not expired (see ``protocol.signed``)."""
    doc = _decode_any(payload)
    kind = doc.get("type")
    cls = COMMANDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown command type {doc.get('type')!r}")
    command = cls.from_payload(payload)
    if keys is not None:
        from device_agent.protocol.signed import verify_command

        verify_command(doc, keys)
    return command


def command_id_of(payload: bytes) -> tuple[str | None, str | None]:
    """(type, command id) of a command, as far as they can be read, to report a rejection."""
    try:
        doc = _decode_any(payload)
    except ProtocolError:
        return None, None
    kind, cid = doc.get("type"), doc.get("command_id")
    return (kind if isinstance(kind, str) else None), (cid if isinstance(cid, str) and len(cid) <= 128 else None)


def _decode_any(payload: bytes) -> dict[str, Any]:
    if len(payload) > MAX_JSON_BYTES:
        raise ProtocolError(f"message of {len(payload)} bytes exceeds {MAX_JSON_BYTES}")
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: [[[[... nested deep
        raise ProtocolError(f"message is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ProtocolError("message must be a JSON object")
    return doc


@dataclass(frozen=True)
class Reply:
    """A device's answer to a status request or bench command, on its reply topic."""

    device_id: str
    command_id: str
    kind: str  # "status", "bench", "trust" or "config"
    ok: bool
    body: dict[str, Any]
    error: str | None = None

    def to_payload(self) -> bytes:
        return _encode("reply", asdict(self))

    @classmethod
    def from_payload(cls, payload: bytes) -> "Reply":
        doc = _decode(payload, "reply")
        return cls(device_id=_get(doc, "device_id", str), command_id=_get(doc, "command_id", str),
                   kind=_get(doc, "kind", str), ok=_get(doc, "ok", bool), body=_get(doc, "body", dict),
                   error=_get(doc, "error", str, optional=True))


@dataclass(frozen=True)
class ChunkRequest:
    """A device asking for chunks of a bundle (the bundle is in the topic). *chunk_size* says how
    the device cut the bundle, so any server answers it alike; *fanout*: the device also listens
    on the bundle's shared chunk topic, and the answer may go there, for every device at once;
    *session* names one download (one subscription to that topic), so the server knows when the
    device started listening."""

    device_id: str
    chunks: tuple[int, ...]
    chunk_size: int | None = None
    fanout: bool = False
    session: str | None = None

    def to_payload(self) -> bytes:
        body: dict[str, Any] = {"device_id": self.device_id, "chunks": list(self.chunks)}
        if self.chunk_size is not None:
            body["chunk_size"] = self.chunk_size
        if self.fanout:
            body["fanout"] = True
        if self.session is not None:
            body["session"] = self.session
        return _encode("chunk_request", body)

    @classmethod
    def from_payload(cls, payload: bytes, max_chunks: int = 1024) -> "ChunkRequest":
        doc = _decode(payload, "chunk_request")
        chunks = _get(doc, "chunks", list)
        if not 0 < len(chunks) <= max_chunks or not all(
                isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in chunks):
            raise ProtocolError(f"chunks must be 1..{max_chunks} non-negative integers")
        chunk_size = _get(doc, "chunk_size", int, optional=True)
        if chunk_size is not None and not 0 < chunk_size <= MAX_CHUNK_SIZE:
            raise ProtocolError("chunk size must be 1 byte to 1 MiB")
        session = _get(doc, "session", str, optional=True)
        if session is not None and len(session) > 32:
            raise ProtocolError("session must be at most 32 characters")
        return cls(device_id=_get(doc, "device_id", str), chunks=tuple(chunks), chunk_size=chunk_size,
                   fanout=bool(_get(doc, "fanout", bool, optional=True)), session=session)


@dataclass(frozen=True)
class Chunk:
    """One piece of a bundle. The header carries a CRC-32 of the data, so a chunk damaged on the
    way is found and asked for again instead of spoiling the whole download (a header with a
    ``sha256`` instead, as the first servers sent, is checked against that). The chunk check is
    against accidents only: what the device trusts is the whole file's SHA-256 from the signed
    offer and manifest, so a cheap checksum (zlib's CRC-32, several times faster than SHA-256)
    is enough here.

    ``data`` is a view into the message, not a copy; ``crc32``: what the header says the data's
    CRC-32 is (None for a ``sha256`` header).
    """

    bundle_sha256: str
    index: int
    data: bytes | memoryview
    crc32: int | None = field(default=None, compare=False)

    _LEN = struct.Struct(">I")

    def to_payload(self, crc: int | None = None) -> bytes:
        """The message; *crc*: the data's CRC-32 if the caller already has it."""
        header = {"bundle": self.bundle_sha256, "index": self.index,
                  "crc32": zlib.crc32(self.data) if crc is None else crc}
        raw = json.dumps(header).encode()
        return b"".join((self._LEN.pack(len(raw)), raw, self.data))

    @classmethod
    def peek(cls, payload: bytes) -> tuple[str, int, dict[str, Any], int]:
        """(bundle, index, header, where the data starts), without touching the data: a device
        drops a chunk it already has before paying for its checksum."""
        if len(payload) < cls._LEN.size:
            raise ProtocolError("chunk message is truncated")
        (header_len,) = cls._LEN.unpack_from(payload)
        if header_len > 1024 or cls._LEN.size + header_len > len(payload):
            raise ProtocolError("chunk header length is out of range")
        header_end = cls._LEN.size + header_len
        try:
            header = json.loads(payload[cls._LEN.size:header_end])
        except (ValueError, UnicodeDecodeError):
            raise ProtocolError("chunk header is not JSON") from None
        if not isinstance(header, dict):
            raise ProtocolError("chunk header must be an object")
        index = _get(header, "index", int)
        if index < 0:
            raise ProtocolError("chunk index must be non-negative")
        return _get(header, "bundle", str), index, header, header_end

    @classmethod
    def from_payload(cls, payload: bytes, peeked: tuple[str, int, dict[str, Any], int] | None = None, *,
                     check_crc: bool = True) -> "Chunk":
        """The chunk, its data checked against its CRC-32 (or, without one, its SHA-256);
        *peeked*: what peek() already said of it. *check_crc* False: the CRC-32 is read, not
        compared — for a caller that checks the whole file and looks at chunks only when that
        fails (device_agent.transfer); a ``sha256`` header is always checked."""
        bundle, index, header, header_end = peeked or cls.peek(payload)
        data = memoryview(payload)[header_end:]
        crc = None
        if "crc32" in header:
            crc = _get(header, "crc32", int)
            if not 0 <= crc < 2**32:
                raise ProtocolError("chunk crc32 is out of range")
            if check_crc and zlib.crc32(data) != crc:
                raise ProtocolError(f"chunk {index} does not match its CRC-32 (damaged on the way)")
        elif hashlib.sha256(data).hexdigest() != _get(header, "sha256", str):
            raise ProtocolError(f"chunk {index} does not match its SHA-256 (damaged on the way)")
        return cls(bundle_sha256=bundle, index=index, data=data, crc32=crc)


# Deployment states a device reports, in the order a successful deployment passes them.
DEPLOY_STATES = ("accepted", "downloading", "verifying", "health_check", "activating", "active")
DEPLOY_FINAL = ("active", "failed", "already_installed", "rolled_back")


@dataclass(frozen=True)
class DeploymentEvent:
    device_id: str
    command_id: str
    state: str
    bundle: str  # "name version"
    progress: float = 0.0
    reason: str | None = None
    timestamp: float = 0.0

    def to_payload(self) -> bytes:
        return _encode("deployment", asdict(self))

    @classmethod
    def from_payload(cls, payload: bytes) -> "DeploymentEvent":
        doc = _decode(payload, "deployment")
        state = _get(doc, "state", str)
        if state not in DEPLOY_STATES + DEPLOY_FINAL:
            raise ProtocolError(f"unknown deployment state {state!r}")
        return cls(device_id=_get(doc, "device_id", str), command_id=_get(doc, "command_id", str),
                   state=state, bundle=_get(doc, "bundle", str),
                   progress=float(_get(doc, "progress", (int, float))),
                   reason=_get(doc, "reason", str, optional=True),
                   timestamp=float(_get(doc, "timestamp", (int, float))))


@dataclass(frozen=True)
class DeviceStatus:
    """The retained status a device announces; its last will says ``online: false``."""

    device_id: str
    online: bool
    timestamp: float
    agent_version: str = ""
    active_bundle: str | None = None  # "name version"
    active_sha256: str | None = None
    labels: dict[str, str] | None = None  # the device's own labels (site, group, ...), from its config
    hardware: dict[str, Any] | None = None  # device_agent.hardware.describe(): class, arch, RAM, runtimes, ...

    def to_payload(self) -> bytes:
        return _encode("status", asdict(self))

    @classmethod
    def from_payload(cls, payload: bytes) -> "DeviceStatus":
        doc = _decode(payload, "status")
        return cls(device_id=_get(doc, "device_id", str), online=_get(doc, "online", bool),
                   timestamp=float(_get(doc, "timestamp", (int, float))),
                   agent_version=_get(doc, "agent_version", str, optional=True) or "",
                   active_bundle=_get(doc, "active_bundle", str, optional=True),
                   active_sha256=_get(doc, "active_sha256", str, optional=True),
                   labels=_labels(_get(doc, "labels", dict, optional=True)),
                   hardware=_get(doc, "hardware", dict, optional=True))


def _labels(value: dict | None) -> dict[str, str] | None:
    if value is None:
        return None
    if len(value) > 32 or not all(isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 128
                                  for k, v in value.items()):
        raise ProtocolError("labels must be up to 32 short strings")
    return dict(value)


@dataclass(frozen=True)
class TelemetrySample:
    """One reporting interval of a device. Absent readings are absent, never zero."""

    device_id: str
    seq: int
    timestamp: float
    interval_s: float
    bundle: str | None
    readings: dict[str, Any]  # collector name -> its readings

    def to_payload(self) -> bytes:
        return _encode("telemetry", asdict(self))

    @classmethod
    def from_payload(cls, payload: bytes) -> "TelemetrySample":
        return cls.from_dict(_decode(payload, "telemetry"))

    @classmethod
    def from_dict(cls, doc: Any) -> "TelemetrySample":
        if not isinstance(doc, dict):
            raise ProtocolError("a telemetry sample must be an object")
        return cls(device_id=_get(doc, "device_id", str), seq=_get(doc, "seq", int),
                   timestamp=float(_get(doc, "timestamp", (int, float))),
                   interval_s=float(_get(doc, "interval_s", (int, float))),
                   bundle=_get(doc, "bundle", str, optional=True),
                   readings=_get(doc, "readings", dict))


MAX_BATCH = 100


@dataclass(frozen=True)
class TelemetryBatch:
    """Samples a device queued (while offline, or since the last interval), oldest first."""

    device_id: str
    samples: tuple[TelemetrySample, ...]

    def to_payload(self) -> bytes:
        return _encode("telemetry_batch", {"device_id": self.device_id,
                                           "samples": [asdict(s) for s in self.samples]})

    @classmethod
    def from_payload(cls, payload: bytes) -> "TelemetryBatch":
        doc = _decode(payload, "telemetry_batch")
        raw = _get(doc, "samples", list)
        if not 0 < len(raw) <= MAX_BATCH:
            raise ProtocolError(f"a batch holds 1..{MAX_BATCH} samples")
        batch = cls(device_id=_get(doc, "device_id", str),
                    samples=tuple(TelemetrySample.from_dict(s) for s in raw))
        if any(s.device_id != batch.device_id for s in batch.samples):
            raise ProtocolError("every sample in a batch must be the batch's device's")
        return batch
