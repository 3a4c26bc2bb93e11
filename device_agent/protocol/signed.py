"""Signed commands: anyone who can publish to a device's command topic must not be able to
make it deploy, roll back or benchmark anything.

A signed command is the command's JSON object with two more fields: ``expires_at`` (Unix time)
and ``signature`` ({alg, key_id, signature}), an Ed25519 signature by a key the device trusts
over the canonical JSON (sorted keys, no spaces) of every other field, ``expires_at`` included.
The device checks the signature, then the expiry; the command id inside the signed part is
what de-duplication keys on, so a replay is dropped as already done.
"""

from __future__ import annotations

import json
import time
from typing import Any, Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from device_agent.bundle.signing import Signature, sign, verify
from device_agent.errors import ProtocolError, SignatureError
from device_agent.protocol.codec import is_number

DEFAULT_EXPIRY = 24 * 3600.0  # long enough for a device that is offline for a day
MAX_EXPIRY = 30 * 86400.0  # the longest the host tools sign a command for (--expires-in)
UNSIGNED_ALLOWED = ("status_request",)  # read-only: asking a device how it is changes nothing


def _canonical(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def sign_command(payload: bytes, private_key: Ed25519PrivateKey, *, expires_in: float = DEFAULT_EXPIRY,
                 now: float | None = None) -> bytes:
    """*payload* (a command's JSON) with an expiry and a signature added."""
    doc = json.loads(payload)
    doc.pop("signature", None)
    doc["expires_at"] = (time.time() if now is None else now) + expires_in
    signature = sign(private_key, _canonical(doc))
    doc["signature"] = json.loads(signature.to_json())
    return json.dumps(doc, separators=(",", ":")).encode()


def verify_command(doc: dict[str, Any], keys: Mapping[str, Ed25519PublicKey], *,
                   now: float | None = None) -> str:
    """Check a decoded command's signature and expiry; returns the signing key id.

    Raises SignatureError (unsigned, unknown key, bad signature) or ProtocolError (expired)."""
    if doc.get("type") in UNSIGNED_ALLOWED:
        return ""
    raw = doc.get("signature")
    if raw is None:
        raise SignatureError("command is not signed")
    signature = Signature.from_json(json.dumps(raw).encode())
    body = {k: v for k, v in doc.items() if k != "signature"}
    key = verify(_canonical(body), signature, keys, what="the command")
    expires_at = body.get("expires_at")
    if not is_number(expires_at):
        raise ProtocolError("signed command has no expiry")  # (NaN would never expire)
    current = time.time() if now is None else now
    if current > expires_at:
        issued = body.get("issued_at")
        hint = ""
        if type(issued) in (int, float) and current - issued > MAX_EXPIRY:  # older than any command can live
            hint = (f" (it was issued {(current - issued) / 86400:.0f} days before this device's clock, "
                    f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(current))} UTC: is the clock right?)")
        raise ProtocolError(f"command expired {current - expires_at:.0f}s ago{hint}")
    return key
