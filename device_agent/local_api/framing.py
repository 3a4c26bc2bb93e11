"""The local API's wire format: length-prefixed frames over a Unix domain socket.

A frame is a 4-byte big-endian length, then that many bytes: one kind byte and
the payload. One connection carries any number of request/response pairs.

    request kinds    r  raw tensors (the client's default: no copies, no zip; see encode_raw)
                     j  JSON {name: nested lists}                 (small inputs)
                     z  NumPy .npz, one array per input name
                     y  NumPy .npy, for a model with a single input
                     d  describe the active model (empty payload)
                     s  agent status             (control socket only)
                     r  roll back                (control socket only)
    response kinds   r  outputs of a raw request
                     j  outputs of a JSON request; also the answer to d, s and r
                     z  outputs of an npz or npy request, by name
                     e  error: one UTF-8 line
"""

from __future__ import annotations

import functools
import io
import json
import socket
import struct
import time
from typing import Any, Mapping

import numpy as np

from device_agent.arrays import read_npy, read_npz
from device_agent.errors import UNREADABLE_ARRAYS, ProtocolError

MAX_FRAME = 256 * 1024 * 1024
_LEN = struct.Struct(">I")

RAW, JSON, NPZ, NPY, DESCRIBE, STATUS, ROLLBACK, ERROR = b"t", b"j", b"z", b"y", b"d", b"s", b"r", b"e"


def send_frame(sock: socket.socket, kind: bytes, payload: bytes = b"") -> None:
    sock.sendall(_LEN.pack(len(payload) + 1) + kind + payload)


class FrameReader:
    """Reads frames from one connection with as few recv calls as possible (usually one per frame).

    *spin*: seconds to poll for the next frame before blocking in recv. A blocked thread's CPU
    goes idle, and waking it (on a VM, a halted vCPU) costs tens of microseconds per request; a
    client that sends its next request within the window skips that. Idle connections cost nothing.
    """

    def __init__(self, sock: socket.socket, spin: float = 0.0) -> None:
        self._sock = sock
        self._buf = bytearray()
        self._spin = spin

    def read(self) -> tuple[bytes, bytes] | None:
        """The next (kind, payload), or None when the peer closed the connection between frames."""
        if self._spin and not self._buf:
            self._poll(time.perf_counter() + self._spin)
        if not self._fill(_LEN.size, allow_eof=True):
            return None
        (length,) = _LEN.unpack_from(self._buf)
        if not 1 <= length <= MAX_FRAME:
            raise ProtocolError(f"frame length {length} is out of range")
        end = _LEN.size + length
        self._fill(end)
        kind, payload = bytes(self._buf[_LEN.size:_LEN.size + 1]), bytes(self._buf[_LEN.size + 1:end])
        del self._buf[:end]
        return kind, payload

    def _poll(self, deadline: float) -> None:
        recv, flags = self._sock.recv, socket.MSG_DONTWAIT
        while True:
            try:
                part = recv(1 << 16, flags)
            except BlockingIOError:
                if time.perf_counter() < deadline:
                    continue
                return
            if part:
                self._buf += part
            return  # data, or EOF (which the blocking read below sees again)

    def _fill(self, n: int, allow_eof: bool = False) -> bool:
        while len(self._buf) < n:
            part = self._sock.recv(max(n - len(self._buf), 1 << 16))
            if not part:
                if allow_eof and not self._buf:
                    return False
                raise ProtocolError("connection closed in the middle of a frame")
            self._buf += part
        return True


def recv_frame(sock: socket.socket) -> tuple[bytes, bytes] | None:
    """One frame from *sock* (for one-off use; a connection's loop keeps a FrameReader)."""
    return FrameReader(sock).read()


def encode_raw(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Raw tensors: a 4-byte header length, a JSON header [[name, dtype, shape], ...], then each
    array's bytes in C order, back to back. Cheap to make and to read: no zip, no parsing of data."""
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    header = _raw_header(tuple((k, v.dtype.str, v.shape) for k, v in arrays.items()))
    return b"".join([header, *(v.tobytes() for v in arrays.values())])


@functools.lru_cache(maxsize=64)
def _raw_header(layout: tuple) -> bytes:
    header = json.dumps([[name, dtype, list(shape)] for name, dtype, shape in layout]).encode()
    return _LEN.pack(len(header)) + header


@functools.lru_cache(maxsize=64)
def _raw_layout(header: bytes) -> tuple[tuple[str, np.dtype, tuple[int, ...], int], ...]:
    """Parsed (and checked) once per distinct header: a client sends the same one every call."""
    layout = []
    for name, dtype, shape in json.loads(header):
        dt = np.dtype(dtype)
        if dt.hasobject or not isinstance(name, str) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError("not a tensor header")
        layout.append((name, dt, tuple(shape), int(np.prod(shape))))
    return tuple(layout)


def decode_raw(payload: bytes) -> dict[str, np.ndarray]:
    try:
        (header_len,) = _LEN.unpack_from(payload)
        offset = _LEN.size + header_len
        arrays = {}
        for name, dt, shape, count in _raw_layout(payload[_LEN.size:offset]):
            arrays[name] = np.frombuffer(payload, dtype=dt, count=count, offset=offset).reshape(shape)
            offset += count * dt.itemsize
        if offset != len(payload):
            raise ValueError("payload length does not match the header")
        return arrays
    except (ValueError, TypeError, struct.error, UnicodeDecodeError, RecursionError) as exc:
        raise ProtocolError(f"cannot decode the raw tensors: {exc}") from None


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
    if kind == RAW:
        return encode_raw(arrays)
    if kind == JSON:
        return json.dumps({name: np.asarray(a).tolist() for name, a in arrays.items()}).encode()
    raise ProtocolError(f"unknown array format {kind!r}")


def decode_arrays(kind: bytes, payload: bytes) -> dict[str, Any]:
    """{name: array} for npz/JSON; {"": array} for .npy (the caller binds it to the only input)."""
    if kind == RAW:
        return decode_raw(payload)
    try:
        if kind == NPY:
            return {"": read_npy(payload)}
        if kind == NPZ:
            return read_npz(payload)
        if kind == JSON:
            doc = json.loads(payload)
            if not isinstance(doc, dict):
                raise ValueError("expected an object of input name -> nested list")
            return doc
    except (*UNREADABLE_ARRAYS, UnicodeDecodeError, RecursionError) as exc:
        raise ProtocolError(f"cannot decode the {kind.decode(errors='replace')!r} payload: {exc}") from None
    raise ProtocolError(f"unknown request kind {kind!r}")
