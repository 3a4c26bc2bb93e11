"""Ed25519 keys and manifest signatures.

A signature travels as a small JSON document next to the manifest::

    {"alg": "ed25519", "key_id": "<16 hex>", "signature": "<base64>"}

The key id is the first 16 hex digits of the SHA-256 of the raw public key, so
a device holding several trusted keys knows which one to try.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from device_agent.errors import ConfigError, SignatureError
from device_agent.protocol.topics import valid_device_id

ALGORITHM = "ed25519"


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class Signature:
    key_id: str
    signature: bytes
    alg: str = ALGORITHM

    def to_json(self) -> bytes:
        doc = {"alg": self.alg, "key_id": self.key_id,
               "signature": base64.b64encode(self.signature).decode("ascii")}
        return json.dumps(doc, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Signature":
        try:
            doc = json.loads(data)
            sig = cls(key_id=str(doc["key_id"]), alg=str(doc["alg"]),
                      signature=base64.b64decode(doc["signature"], validate=True))
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise SignatureError(f"malformed signature document: {exc}") from None
        if sig.alg != ALGORITHM:
            raise SignatureError(f"unsupported signature algorithm {sig.alg!r}")
        return sig


def generate_key_pair(directory: Path, name: str) -> tuple[Path, Path]:
    """Write NAME.key (private, mode 0600) and NAME.pub (public) as PEM files."""
    if not valid_device_id(name):  # a device id's rule: a plain file name as well as a topic level
        raise ConfigError(f"key name {name!r} must be 1-64 letters, digits, '.', '_' or '-' (it names the files "
                          f"in {directory}), starting with a letter or digit")
    directory.mkdir(parents=True, exist_ok=True)
    private_path, public_path = directory / f"{name}.key", directory / f"{name}.pub"
    if private_path.exists():
        raise ConfigError(f"{private_path} already exists; refusing to overwrite a signing key")
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    public_path.write_text(public_key_pem(private.public_key()))
    return private_path, public_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as exc:
        raise ConfigError(f"cannot read signing key {path}: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        return public_key_from_pem(Path(path).read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read public key {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"{path} is {exc}") from None


def public_key_from_pem(pem: bytes) -> Ed25519PublicKey:
    """The Ed25519 public key in *pem*; ValueError saying what it is not otherwise."""
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as exc:
        raise ValueError(f"not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("not an Ed25519 public key")
    return key


def public_key_pem(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def trusted_keys(paths: Iterable[Path]) -> dict[str, Ed25519PublicKey]:
    """Load public keys into the {key_id: key} mapping that verification takes."""
    keys = {}
    for path in paths:
        key = load_public_key(path)
        keys[key_id(key)] = key
    return keys


def sign(private_key: Ed25519PrivateKey, message: bytes) -> Signature:
    return Signature(key_id=key_id(private_key.public_key()), signature=private_key.sign(message))


def verify(message: bytes, signature: Signature, keys: Mapping[str, Ed25519PublicKey],
           what: str = "the manifest") -> str:
    """Check *signature* over *message* (*what* it signs) against the trusted *keys*; return the key id."""
    problem = getattr(keys, "problem", None)  # a TrustStore that cannot be read trusts nothing
    if problem:
        raise SignatureError(problem)
    if signature.key_id in getattr(keys, "revoked", ()):
        raise SignatureError(f"signed by key {signature.key_id}, which has been revoked")
    key = keys.get(signature.key_id)
    if key is None:
        raise SignatureError(f"signed by key {signature.key_id}, which this device does not trust")
    try:
        key.verify(signature.signature, message)
    except InvalidSignature:
        raise SignatureError(f"signature by key {signature.key_id} does not match {what}") from None
    return signature.key_id
