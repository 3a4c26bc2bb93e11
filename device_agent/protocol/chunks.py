"""Messages of the bundle transfer: the offer that names a bundle, a device's chunk requests,
and the chunks. Chunks are binary: a 4-byte big-endian header length, a JSON header, the data."""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

from device_agent.errors import ProtocolError
from device_agent.protocol.codec import decode, encode, require

MAX_CHUNK_SIZE = 1 << 20
MIN_CHUNK_SIZE = 1024  # the least a host offers: smaller, and the headers outweigh the data
# A chunk message (data, a ~110-byte header, the topic) stays well under the 128 KB a managed broker
# such as AWS IoT Core allows per message. 120 KiB chunks cost a device less CPU per MiB, but 100
# devices fetching one bundle had it no sooner (docs/benchmarks.md, Rollout, 2026-12-02, a fifth session).
DEFAULT_CHUNK_SIZE = 64 * 1024


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
    # Bytes the bundle's files take once unpacked (the manifest's sizes): a device needs room for the
    # download and for them, and checks before it fetches anything. None: an older host; not checked.
    unpacked_size: int | None = None

    @property
    def chunk_count(self) -> int:
        return max(1, -(-self.size // self.chunk_size))

    @classmethod
    def from_dict(cls, doc: Any) -> "BundleOffer":
        if not isinstance(doc, dict):
            raise ProtocolError("bundle offer must be an object")
        offer = cls(sha256=require(doc, "sha256", str), size=require(doc, "size", int),
                    chunk_size=require(doc, "chunk_size", int), name=require(doc, "name", str),
                    version=require(doc, "version", str), target=require(doc, "target", dict, optional=True),
                    unpacked_size=require(doc, "unpacked_size", int, optional=True))
        if len(offer.sha256) != 64 or any(c not in "0123456789abcdef" for c in offer.sha256):
            raise ProtocolError("bundle sha256 must be 64 lower-case hex digits")
        if not 0 < offer.size or not 0 < offer.chunk_size <= MAX_CHUNK_SIZE:
            raise ProtocolError("bundle size and chunk size must be positive (chunk size at most 1 MiB)")
        if offer.unpacked_size is not None and offer.unpacked_size < 0:
            raise ProtocolError("unpacked size must not be negative")
        return offer


@dataclass(frozen=True)
class ChunkRequest:
    """A device asking for chunks of a bundle (the bundle is in the topic). *chunk_size* says how
    the device cut the bundle, so any server answers it alike; *fanout*: the device also listens
    on the bundle's shared chunk topic, and the answer may go there, for every device at once;
    *session* names one download (one subscription to that topic), so the server knows when the
    device started listening; *seen*: the lowest ``seq`` of a chunk the session has received on that
    topic, so the server knows which of its publishes there reached the device (all from that one on);
    a request may carry no chunks only to say that."""

    device_id: str
    chunks: tuple[int, ...]
    chunk_size: int | None = None
    fanout: bool = False
    session: str | None = None
    seen: int | None = None

    def to_payload(self) -> bytes:
        body: dict[str, Any] = {"device_id": self.device_id, "chunks": list(self.chunks)}
        if self.chunk_size is not None:
            body["chunk_size"] = self.chunk_size
        if self.fanout:
            body["fanout"] = True
        if self.session is not None:
            body["session"] = self.session
        if self.seen is not None:
            body["seen"] = self.seen
        return encode("chunk_request", body)

    @classmethod
    def from_payload(cls, payload: bytes, max_chunks: int = 1024) -> "ChunkRequest":
        doc = decode(payload, "chunk_request")
        chunks = require(doc, "chunks", list)
        if not len(chunks) <= max_chunks or not all(
                isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in chunks):
            raise ProtocolError(f"chunks must be 1..{max_chunks} non-negative integers")
        chunk_size = require(doc, "chunk_size", int, optional=True)
        if chunk_size is not None and not 0 < chunk_size <= MAX_CHUNK_SIZE:
            raise ProtocolError("chunk size must be 1 byte to 1 MiB")
        session = require(doc, "session", str, optional=True)
        if session is not None and len(session) > 32:
            raise ProtocolError("session must be at most 32 characters")
        seen = require(doc, "seen", int, optional=True)
        if seen is not None and seen < 0:
            raise ProtocolError("seen must be a non-negative integer")
        if not chunks and (seen is None or not doc.get("fanout")):
            raise ProtocolError(f"chunks must be 1..{max_chunks} non-negative integers (none only to say "
                                "what a fan-out download has seen)")
        return cls(device_id=require(doc, "device_id", str), chunks=tuple(chunks), chunk_size=chunk_size,
                   fanout=bool(require(doc, "fanout", bool, optional=True)), session=session, seen=seen)


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

    def to_payload(self, crc: int | None = None, seq: int | None = None) -> bytes:
        """The message; *crc*: the data's CRC-32 if the caller already has it; *seq*: the server's
        number of this publish on a bundle's shared topic (see ChunkRequest.seen)."""
        header = {"bundle": self.bundle_sha256, "index": self.index,
                  "crc32": zlib.crc32(self.data) if crc is None else crc}
        if seq is not None:
            header["seq"] = seq
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
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: [[[[... nested deep
            raise ProtocolError("chunk header is not JSON") from None
        if not isinstance(header, dict):
            raise ProtocolError("chunk header must be an object")
        index = require(header, "index", int)
        if index < 0:
            raise ProtocolError("chunk index must be non-negative")
        return require(header, "bundle", str), index, header, header_end

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
            crc = require(header, "crc32", int)
            if not 0 <= crc < 2**32:
                raise ProtocolError("chunk crc32 is out of range")
            if check_crc and zlib.crc32(data) != crc:
                raise ProtocolError(f"chunk {index} does not match its CRC-32 (damaged on the way)")
        elif hashlib.sha256(data).hexdigest() != require(header, "sha256", str):
            raise ProtocolError(f"chunk {index} does not match its SHA-256 (damaged on the way)")
        return cls(bundle_sha256=bundle, index=index, data=data, crc32=crc)
