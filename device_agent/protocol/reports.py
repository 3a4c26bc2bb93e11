"""What devices report to the host: deployment progress, their retained status, telemetry."""

from __future__ import annotations

import datetime as dt
import math
import re
from dataclasses import asdict, dataclass
from typing import Any

from device_agent.errors import ProtocolError
from device_agent.protocol.codec import decode, encode, require, require_finite


MAX_TIME = 1e11  # Unix time in the year 5138: anything past it is not a time, and datetime cannot show it


def _time(doc: dict[str, Any], key: str) -> float:
    """A Unix time field: 0 to MAX_TIME (a NaN one would fail every comparison the host makes, and
    SQLite stores it as NULL)."""
    value = float(require(doc, key, (int, float)))
    if not 0 <= value < MAX_TIME:
        raise ProtocolError(f"field {key!r} must be a Unix time")
    return value


def _measured(value: Any) -> Any:
    """Free-form readings with NaN and Infinity (which Python's JSON reads) made None: not a
    measurement, so shown as n/a, and what the host stores and serves stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _measured(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_measured(v) for v in value]
    return value


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
        return encode("deployment", asdict(self))

    @classmethod
    def from_payload(cls, payload: bytes) -> "DeploymentEvent":
        return cls.from_dict(decode(payload, "deployment"))

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> "DeploymentEvent":
        state = require(doc, "state", str)
        if state not in DEPLOY_STATES + DEPLOY_FINAL:
            raise ProtocolError(f"unknown deployment state {state!r}")
        return cls(device_id=require(doc, "device_id", str), command_id=require(doc, "command_id", str),
                   state=state, bundle=require(doc, "bundle", str),
                   progress=require_finite(doc, "progress"),
                   reason=require(doc, "reason", str, optional=True),
                   timestamp=_time(doc, "timestamp"))


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
    # Other agents seen with this device id (device_agent.presence): host, pid, since, seen, how.
    id_shared_with: list[dict[str, Any]] | None = None
    # The client certificate it shows the broker (device_agent.client_cert): serial, expires, source,
    # ca_expires, ca_keys.
    certificate: dict[str, str] | None = None
    # The outcome of the last update (deploy or rollback) it carried out, as its final event said it:
    # the event itself can be lost (sent while the host was away), the retained status is not.
    last_update: DeploymentEvent | None = None
    # In the last will only: the agent process whose connection it was (device_agent.presence), so
    # that the one holding the device id tells its own will from another connection's.
    instance: str | None = None

    def to_payload(self) -> bytes:
        doc = asdict(self)
        if doc["instance"] is None:
            del doc["instance"]
        return encode("status", doc)

    @classmethod
    def from_payload(cls, payload: bytes) -> "DeviceStatus":
        doc = decode(payload, "status")
        return cls(device_id=require(doc, "device_id", str), online=require(doc, "online", bool),
                   timestamp=_time(doc, "timestamp"),
                   agent_version=require(doc, "agent_version", str, optional=True) or "",
                   active_bundle=require(doc, "active_bundle", str, optional=True),
                   active_sha256=require(doc, "active_sha256", str, optional=True),
                   labels=_labels(require(doc, "labels", dict, optional=True)),
                   hardware=_measured(require(doc, "hardware", dict, optional=True)),
                   id_shared_with=_rivals(require(doc, "id_shared_with", list, optional=True)),
                   certificate=_certificate(require(doc, "certificate", dict, optional=True)),
                   last_update=_last_update(require(doc, "last_update", dict, optional=True), doc["device_id"]),
                   instance=_instance(require(doc, "instance", str, optional=True)))


def _instance(value: str | None) -> str | None:
    if value is not None and not 0 < len(value) <= 64:
        raise ProtocolError("instance: 1 to 64 characters")
    return value


def _last_update(value: dict | None, device_id: str) -> DeploymentEvent | None:
    if value is None:
        return None
    event = DeploymentEvent.from_dict(value)
    if event.state not in DEPLOY_FINAL or event.device_id != device_id:
        raise ProtocolError("last_update must be a final deployment event of the device itself")
    return event


RIVAL_FIELDS = {"host": str, "pid": int, "since": (int, float), "seen": (int, float), "how": str}
MAX_RIVALS = 8  # other agents a status lists (device_agent.presence keeps no more)


def _rivals(value: list | None) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    if len(value) > MAX_RIVALS:
        raise ProtocolError(f"id_shared_with lists at most {MAX_RIVALS} agents")
    rivals = []
    for item in value:
        if not isinstance(item, dict):
            raise ProtocolError("id_shared_with holds objects")
        rival = {k: require(item, k, kind) for k, kind in RIVAL_FIELDS.items()}
        if len(rival["host"]) > 255 or rival["how"] not in ("asked", "connected") or not all(
                0 <= rival[k] < MAX_TIME for k in ("since", "seen")):  # (NaN fails too)
            raise ProtocolError("id_shared_with: host up to 255 characters, how 'asked' or 'connected', "
                                "since and seen Unix times")
        rivals.append(rival)
    return rivals


def _certificate(value: dict | None) -> dict[str, str] | None:
    if value is None:
        return None
    cert = {k: require(value, k, str) for k in ("serial", "expires", "source")}
    ca_expires = require(value, "ca_expires", str, optional=True)  # (agents from before leave it out)
    if ca_expires is not None:
        cert["ca_expires"] = ca_expires
    ca_keys = require(value, "ca_keys", str, optional=True)
    if ca_keys is not None:
        cert["ca_keys"] = ca_keys
    times = [cert["expires"]] + ([ca_expires] if ca_expires is not None else [])
    if len(cert["serial"]) > 40 or not all(map(_zoned_time, times)) or cert["source"] not in ("config", "renewed") \
            or (ca_keys is not None and not _KEY_IDS.fullmatch(ca_keys)):
        raise ProtocolError("certificate: serial up to 40 hex digits, expires (and ca_expires) an ISO 8601 time "
                            f"with its zone, source 'config' or 'renewed', ca_keys up to {MAX_CA_KEYS} SHA-256 "
                            "digests (hex, comma-separated)")
    return cert


MAX_CA_KEYS = 16  # a device trusting more (a system CA bundle) leaves ca_keys out
KEY_ID = r"[0-9a-f]{64}"  # a CA's key as device_agent.certificates.key_id names it
_KEY_IDS = re.compile(rf"{KEY_ID}(,{KEY_ID}){{0,{MAX_CA_KEYS - 1}}}")


def _zoned_time(text: str) -> bool:
    try:
        return dt.datetime.fromisoformat(text).tzinfo is not None
    except ValueError:
        return False


def expires_at(certificate: dict[str, str] | None, which: str = "expires") -> float | None:
    """When a status's (validated) certificate expires, as Unix time; with *which* "ca_expires",
    when the CA the device trusts for it does (None: not said)."""
    return dt.datetime.fromisoformat(certificate[which]).timestamp() if certificate and which in certificate else None


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
        return encode("telemetry", self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        """The fields as they are: *readings* is JSON already, and dataclasses.asdict would copy it
        value by value (most of a telemetry message's encoding time)."""
        return {"device_id": self.device_id, "seq": self.seq, "timestamp": self.timestamp,
                "interval_s": self.interval_s, "bundle": self.bundle, "readings": self.readings}

    @classmethod
    def from_payload(cls, payload: bytes) -> "TelemetrySample":
        return cls.from_dict(decode(payload, "telemetry"))

    @classmethod
    def from_dict(cls, doc: Any) -> "TelemetrySample":
        if not isinstance(doc, dict):
            raise ProtocolError("a telemetry sample must be an object")
        seq = require(doc, "seq", int)
        if not 0 <= seq < 2**63:  # what SQLite's integers hold
            raise ProtocolError("field 'seq' must be 0 to 2**63 - 1")
        return cls(device_id=require(doc, "device_id", str), seq=seq,
                   timestamp=_time(doc, "timestamp"),
                   interval_s=require_finite(doc, "interval_s"),
                   bundle=require(doc, "bundle", str, optional=True),
                   readings=_measured(require(doc, "readings", dict)))


MAX_BATCH = 100


@dataclass(frozen=True)
class TelemetryBatch:
    """Samples a device queued (while offline, or since the last interval), oldest first."""

    device_id: str
    samples: tuple[TelemetrySample, ...]

    def to_payload(self) -> bytes:
        return encode("telemetry_batch", {"device_id": self.device_id,
                                           "samples": [s.to_dict() for s in self.samples]})

    @classmethod
    def from_payload(cls, payload: bytes) -> "TelemetryBatch":
        doc = decode(payload, "telemetry_batch")
        raw = require(doc, "samples", list)
        if not 0 < len(raw) <= MAX_BATCH:
            raise ProtocolError(f"a batch holds 1..{MAX_BATCH} samples")
        batch = cls(device_id=require(doc, "device_id", str),
                    samples=tuple(TelemetrySample.from_dict(s) for s in raw))
        if any(s.device_id != batch.device_id for s in batch.samples):
            raise ProtocolError("every sample in a batch must be the batch's device's")
        return batch
