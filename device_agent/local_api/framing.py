"""The local API's wire format: length-prefixed frames over a Unix domain socket.

A frame is a 4-byte big-endian length, then that many bytes: one kind byte and
the payload. One connection carries any number of request/response pairs.

    request kinds    j  JSON {"inputs": {name: nested lists}}     (small inputs)
                     z  NumPy .npz, one array per input name
                     y  NumPy .npy, for a model with a single input
                     d  describe the active model (empty payload)
                     s  agent status             (control socket only)
                     r  roll back                (control socket only)
    response kinds   j  outputs of a JSON request; also the answer to d, s and r
                     z  outputs of an npz or npy request, by name
                     e  error: one UTF-8 line
"""

from __future__ import annotations

import io
import json
import socket
import struct
from typing import Any, Mapping

import numpy as np

from device_agent.errors import ProtocolError

MAX_FRAME = 256 * 1024 * 1024
_LEN = struct.Struct(">I")

JSON, NPZ, NPY, DESCRIBE, STATUS, ROLLBACK, ERROR = b"j", b"z", b"y", b"d", b"s", b"r", b"e"


def send_frame(sock: socket.socket, kind: bytes, payload: bytes = b"") -> None:
    sock.sendall(_LEN.pack(len(payload) + 1) + kind + payload)


def recv_frame(sock: socket.socket) -> tuple[bytes, bytes] | None:
    """The next (kind, payload), or None when the peer closed the connection between frames."""
    header = _recv_exactly(sock, _LEN.size, allow_eof=True)
    if header is None:
        return None
    (length,) = _LEN.unpack(header)
    if not 1 <= length <= MAX_FRAME:
        raise ProtocolError(f"frame length {length} is out of range")
    body = _recv_exactly(sock, length)
    return body[:1], body[1:]


def _recv_exactly(sock: socket.socket, n: int, allow_eof: bool = False) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        part = sock.recv(min(n - len(buf), 1 << 20))
        if not part:
            if allow_eof and not buf:
                return None
            raise ProtocolError("connection closed in the middle of a frame")
        buf += part
    return bytes(buf)


def encode_arrays(kind: bytes, arrays: Mapping[str, np.ndarray]) -> bytes:
    if kind == NPY:
        if len(arrays) != 1:
            raise ProtocolError(f".npy carries one array, not {len(arrays)}")
        buf = io.BytesIO()
        np.save(buf, next(iter(arrays.values())), allow_pickle=False)
        return buf.getvalue()
    if kind == NPZ:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()
    if kind == JSON:
        return json.dumps({name: np.asarray(a).tolist() for name, a in arrays.items()}).encode()
    raise ProtocolError(f"unknown array format {kind!r}")


def decode_arrays(kind: bytes, payload: bytes) -> dict[str, Any]:
    """{name: array} for npz/JSON; {"": array} for .npy (the caller binds it to the only input)."""
    try:
        if kind == NPY:
            return {"": np.load(io.BytesIO(payload), allow_pickle=False)}
        if kind == NPZ:
            with np.load(io.BytesIO(payload), allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        if kind == JSON:
            doc = json.loads(payload)
            if not isinstance(doc, dict):
                raise ValueError("expected an object of input name -> nested list")
            return doc
    except (ValueError, OSError, EOFError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"cannot decode the {kind.decode(errors='replace')!r} payload: {exc}") from None
    raise ProtocolError(f"unknown request kind {kind!r}")
