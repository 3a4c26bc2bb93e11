"""Commands from the host to a device (deploy, rollback, status, bench, trust, config, certificate), each a
small frozen class with one encoding, and the Reply a device answers some of them with."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from device_agent.errors import ProtocolError
from device_agent.protocol.chunks import BundleOffer
from device_agent.protocol.codec import decode, decode_object, encode, is_number, require, require_finite
from device_agent.protocol.reports import KEY_ID


def _header(doc: dict) -> dict[str, Any]:
    """What every command carries: its id and when it was issued."""
    return {"command_id": require(doc, "command_id", str), "issued_at": require_finite(doc, "issued_at")}


@dataclass(frozen=True)
class DeployCommand:
    command_id: str
    bundle: BundleOffer
    issued_at: float
    allow_downgrade: bool = False  # install a lower release than the one committed (signed, so deliberate)

    def to_payload(self) -> bytes:
        return encode("deploy", {"command_id": self.command_id, "issued_at": self.issued_at,
                                  "bundle": asdict(self.bundle), "allow_downgrade": self.allow_downgrade})

    @classmethod
    def from_payload(cls, payload: bytes) -> "DeployCommand":
        doc = decode(payload, "deploy")
        return cls(**_header(doc),
                   bundle=BundleOffer.from_dict(doc.get("bundle")),
                   allow_downgrade=bool(require(doc, "allow_downgrade", bool, optional=True)))


@dataclass(frozen=True)
class RollbackCommand:
    """Go back to the newest committed version before the active one."""

    command_id: str
    issued_at: float

    def to_payload(self) -> bytes:
        return encode("rollback", {"command_id": self.command_id, "issued_at": self.issued_at})

    @classmethod
    def from_payload(cls, payload: bytes) -> "RollbackCommand":
        doc = decode(payload, "rollback")
        return cls(**_header(doc))


@dataclass(frozen=True)
class StatusRequest:
    """Ask a device for an AgentReport on its reply topic."""

    command_id: str
    issued_at: float

    def to_payload(self) -> bytes:
        return encode("status_request", {"command_id": self.command_id, "issued_at": self.issued_at})

    @classmethod
    def from_payload(cls, payload: bytes) -> "StatusRequest":
        doc = decode(payload, "status_request")
        return cls(**_header(doc))


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
        return encode("bench", {"command_id": self.command_id, "issued_at": self.issued_at,
                                 "bundle": asdict(self.bundle) if self.bundle else None,
                                 "runs": self.runs, "warmup": self.warmup})

    @classmethod
    def from_payload(cls, payload: bytes) -> "BenchCommand":
        doc = decode(payload, "bench")
        runs, warmup = require(doc, "runs", int), require(doc, "warmup", int)
        if not 0 < runs <= MAX_BENCH_RUNS or not 0 <= warmup <= MAX_BENCH_RUNS:
            raise ProtocolError(f"runs must be 1..{MAX_BENCH_RUNS} and warmup 0..{MAX_BENCH_RUNS}")
        bundle = doc.get("bundle")
        return cls(**_header(doc),
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
        return encode("trust", {"command_id": self.command_id, "issued_at": self.issued_at,
                                 "add": list(self.add), "revoke": list(self.revoke)})

    @classmethod
    def from_payload(cls, payload: bytes) -> "TrustCommand":
        doc = decode(payload, "trust")
        add, revoke = require(doc, "add", list), require(doc, "revoke", list)
        if not all(isinstance(x, str) for x in add + revoke):
            raise ProtocolError("'add' and 'revoke' must be lists of strings")
        if not add and not revoke or len(add) > MAX_TRUST_CHANGES or len(revoke) > MAX_TRUST_CHANGES:
            raise ProtocolError(f"a trust change adds or revokes 1..{MAX_TRUST_CHANGES} keys")
        return cls(**_header(doc),
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
        return encode("config", {"command_id": self.command_id, "issued_at": self.issued_at,
                                  "settings": self.settings})

    @classmethod
    def from_payload(cls, payload: bytes) -> "ConfigCommand":
        doc = decode(payload, "config")
        settings = require(doc, "settings", dict)
        if len(settings) > 32 or not all(
                isinstance(k, str) and (v is None or is_number(v)) for k, v in settings.items()):
            raise ProtocolError("settings must map up to 32 names to finite numbers (or null)")
        return cls(**_header(doc),
                   settings=settings)


MAX_CERTIFICATE = 16 * 1024  # a PEM certificate is 1-2 KiB
MAX_RETIRED_CAS = 64
_KEY_ID = re.compile(KEY_ID)


@dataclass(frozen=True)
class CertificateCommand:
    """Present this renewed client certificate (PEM, over the device's own key) to the broker from
    now on, and trust *ca*, the CA's current certificate, if it renews one the device trusts, or if
    *ca_link* — the same CA signed by one the device trusts — vouches for a new CA key (see
    ``device_agent.client_cert``), and stop trusting the CAs over the keys *ca_retired* (SHA-256
    of each public key, hex), which the host retired; answered with a Reply."""

    command_id: str
    issued_at: float
    certificate: str
    ca: str | None = None
    ca_link: str | None = None
    ca_retired: tuple[str, ...] = ()

    def to_payload(self) -> bytes:
        return encode("certificate", {"command_id": self.command_id, "issued_at": self.issued_at,
                                       "certificate": self.certificate,
                                       **({"ca": self.ca} if self.ca is not None else {}),
                                       **({"ca_link": self.ca_link} if self.ca_link is not None else {}),
                                       **({"ca_retired": list(self.ca_retired)} if self.ca_retired else {})})

    @classmethod
    def from_payload(cls, payload: bytes) -> "CertificateCommand":
        doc = decode(payload, "certificate")
        retired = require(doc, "ca_retired", list, optional=True) or []
        if len(retired) > MAX_RETIRED_CAS or not all(isinstance(k, str) and _KEY_ID.fullmatch(k) for k in retired):
            raise ProtocolError(f"'ca_retired' must list up to {MAX_RETIRED_CAS} SHA-256 digests (64 hex digits)")
        return cls(**_header(doc), certificate=_pem(doc, "certificate"),
                   ca=_pem(doc, "ca") if doc.get("ca") is not None else None,
                   ca_link=_pem(doc, "ca_link") if doc.get("ca_link") is not None else None,
                   ca_retired=tuple(retired))


def _pem(doc: dict, key: str) -> str:
    pem = require(doc, key, str)
    if not pem.startswith("-----BEGIN CERTIFICATE-----") or len(pem) > MAX_CERTIFICATE:
        raise ProtocolError(f"{key!r} must be one PEM certificate of up to {MAX_CERTIFICATE} characters")
    return pem


COMMANDS = {"deploy": DeployCommand, "rollback": RollbackCommand, "status_request": StatusRequest,
            "bench": BenchCommand, "trust": TrustCommand, "config": ConfigCommand, "certificate": CertificateCommand}
# The commands a device answers with a Reply (the others with deployment events).
ANSWERED = ("status_request", "bench", "trust", "config", "certificate")


def parse_command(payload: bytes, keys=None):
    """Decode any host -> device command by its ``type``; with *keys*, it must be signed by one
    of them and not expired (see ``protocol.signed``)."""
    doc = decode_object(payload)
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
        doc = decode_object(payload)
    except ProtocolError:
        return None, None
    kind, cid = doc.get("type"), doc.get("command_id")
    return (kind if isinstance(kind, str) else None), (cid if isinstance(cid, str) and len(cid) <= 128 else None)


@dataclass(frozen=True)
class Reply:
    """A device's answer to a status request or bench command, on its reply topic."""

    device_id: str
    command_id: str
    kind: str  # "status", "bench", "trust", "config" or "certificate"
    ok: bool
    body: dict[str, Any]
    error: str | None = None

    def to_payload(self) -> bytes:
        return encode("reply", asdict(self))

    @classmethod
    def from_payload(cls, payload: bytes) -> "Reply":
        doc = decode(payload, "reply")
        return cls(device_id=require(doc, "device_id", str), command_id=require(doc, "command_id", str),
                   kind=require(doc, "kind", str), ok=require(doc, "ok", bool), body=require(doc, "body", dict),
                   error=require(doc, "error", str, optional=True))
