"""The JSON encoding every protocol message but a chunk shares: UTF-8 objects with a ``type``
field. Decoding validates types and bounds and raises ProtocolError, never KeyError or
TypeError, so a malformed message from the network is logged and dropped, never a crash."""

from __future__ import annotations

import json
import math
from typing import Any

from device_agent.errors import ProtocolError

MAX_JSON_BYTES = 256 * 1024


def decode_object(payload: bytes) -> dict[str, Any]:
    if len(payload) > MAX_JSON_BYTES:
        raise ProtocolError(f"message of {len(payload)} bytes exceeds {MAX_JSON_BYTES}")
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: [[[[... nested deep
        raise ProtocolError(f"message is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ProtocolError("message must be a JSON object")
    return doc


def decode(payload: bytes, expected_type: str) -> dict[str, Any]:
    doc = decode_object(payload)
    if doc.get("type") != expected_type:
        raise ProtocolError(f"expected a {expected_type!r} message")
    return doc


def is_number(value: Any) -> bool:
    """A JSON number that is a number: not a bool, and not NaN or Infinity (which Python's JSON
    reads, and NaN passes every comparison, so any range check on it would pass)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def require_finite(doc: dict[str, Any], key: str) -> float:
    """Field *key* as a float, refused if it is not a number or is NaN or Infinity (see is_number)."""
    value = float(require(doc, key, (int, float)))
    if not math.isfinite(value):
        raise ProtocolError(f"field {key!r} must be a finite number")
    return value


def require(doc: dict[str, Any], key: str, kind: type | tuple[type, ...], *, optional: bool = False) -> Any:
    value = doc.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ProtocolError(f"field {key!r} has the wrong type")
    if not isinstance(value, kind):
        raise ProtocolError(f"field {key!r} is missing or has the wrong type")
    return value


def encode(kind: str, body: dict[str, Any]) -> bytes:
    return json.dumps({"type": kind, **body}, separators=(",", ":")).encode()
