"""Device side of bundle transfer: fetch a bundle over MQTT as chunks it asks for.

The device keeps a window of chunk requests in flight, writes each chunk at its
offset in a partial file, re-asks for chunks that have not arrived after a
timeout (``request_window`` decides which and when), and checks the whole file's
SHA-256 at the end.

Each chunk message carries a CRC-32 of its data. The device keeps it but does not compute
it as the chunk arrives: the whole file's SHA-256 covers every byte anyway, so on the usual
download the per-chunk check would only cost time (a tenth of the device's work per chunk).
When the file's hash does not match, the chunks whose data does not match their CRC-32 are
the ones damaged on the way: they are fetched again (up to REPAIRS times), and only when no
chunk explains the mismatch is the whole file thrown away.

With *fanout* the device also listens on the bundle's shared chunk topic while it downloads:
a chunk the server publishes there once reaches every device fetching the same bundle, so a
fleet pulls one copy through the host's uplink instead of one per device.

The whole file's SHA-256 is computed as the chunks arrive (the longest run of chunks from the
start, read back from the page cache when they came out of order), so it is ready when the last
chunk lands instead of costing a second pass over the file.

Downloads resume: next to ``<sha>.part`` a ``<sha>.chunks`` record (one byte per
chunk, then each chunk's CRC-32) lists the chunks already written. It is saved at most
once a second; after a restart or a failed attempt, those chunks are not fetched again.
Nothing of a download is fsync'd: the record is a hint that the file's hash and the CRC-32s
check. After a power cut it may claim chunks whose data never reached the disk; they fail
their CRC-32 when the hash fails and are fetched again. (The fsyncs a save used to take
were a tenth of the device threads' samples in a py-spy profile of benchmarks/delivery.py
(b), and an SD card wears.) For the same reason a save overwrites the record in place, one
write, rather than writing a new file and renaming it over the old one (a file created and a
directory changed once a second): a torn record is caught like a torn chunk. A completed
download is verified and unpacked at once, and what is unpacked is fsync'd before it is
activated.

The partial file's blocks are reserved when it is created (``posix_fallocate``): a download that
fits when it starts cannot run out of disk half-way because something else on the device filled
it. A write that fails all the same (a full disk on a file system that cannot reserve, an SD card
failing with EIO) ends the download at once with that reason, and its partial file is removed.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import Callable

from device_agent.errors import ProtocolError, StorageError, TransferError, TransferTimeout
from device_agent.files import size_text
from device_agent.mqtt import MqttClient
from device_agent.protocol import topics
from device_agent.protocol.chunks import BundleOffer, Chunk, ChunkRequest
from device_agent.request_window import RequestWindow

RECORD_EVERY = 1.0  # seconds between saves of the received-chunk record
# Devices subscribe to chunk topics at QoS 0: the server publishes at QoS 1 (the broker's
# acknowledgements pace it), but an acknowledgement per chunk from the device would only repeat
# what the download does itself — it asks again for any chunk that does not arrive (one lost
# with a dropped connection). Without them the broker and the device each handle one packet
# less per chunk (docs/protocol.md: one device's transfer 15% faster).
CHUNK_QOS = 0
REPAIRS = 3  # times a download whose hash fails fetches its damaged chunks again before giving up

log = logging.getLogger(__name__)


class ChunkRouter:
    """Subscribed once at start-up, so chunks never race a fresh subscription; hands
    each chunk message to the download in progress, if any."""

    def __init__(self) -> None:
        self.target: Callable[[str, bytes], None] | None = None
        self.received = 0  # bytes of chunk messages that reached this device, needed or not
        self.asked_again = 0  # chunks its downloads asked for again (no answer came within their retry time)

    def __call__(self, topic: str, payload: bytes) -> None:
        self.received += len(payload)
        target = self.target
        if target is not None:
            target(topic, payload)


class Download:
    def __init__(self, client: MqttClient, router: ChunkRouter, device_id: str, offer: BundleOffer,
                 dest: Path, *,
                 window: int = 8, retry_after: float = 3.0, stall_timeout: float = 30.0,
                 fanout: bool = True, on_progress: Callable[[float], None] | None = None) -> None:
        self._client = client
        self._router = router
        self._device_id = device_id
        self._offer = offer
        self._dest = dest
        self._stall_timeout = stall_timeout
        self._on_progress = on_progress
        self._fanout = fanout
        self._session = os.urandom(4).hex()  # this download's subscription to the shared chunk topic
        self._connection = 0  # the client's connection count the session began on
        self._asked_on = 0  # and the one our last request went out on
        self._shared: str | None = None  # that topic, while subscribed
        self._seen: int | None = None  # the lowest publish number (seq) the session received there
        self._tell_seen = False  # the server does not know it yet
        self._refill_at = max(1, window // 4)  # free slots that make a new request worth sending
        self._cond = threading.Condition()
        self._received: dict[int, int] = {}  # chunk written -> the CRC-32 its message carried
        self._asks = RequestWindow(offer.chunk_count, window=window, retry_after=retry_after,
                                   stall_timeout=stall_timeout, unread=lambda: client.unread > 0,
                                   connection_held=self._connection_held)
        self._last_progress = time.monotonic()
        self._resumed = 0
        self._closed = False  # run() has ended: a chunk still arriving is not written
        self._write_error: OSError | None = None  # a chunk could not be written: the download ends
        self._hasher = hashlib.sha256()
        self._hashed = 0  # chunks 0.._hashed-1 are in the running hash
        self.messages = self.duplicates = 0  # chunk messages seen, and those not needed
        self.asked_again = 0  # chunks asked for again: no answer came within retry_after

    @property
    def record_path(self) -> Path:
        return self._dest.with_suffix(".chunks")

    @property
    def resumed_chunks(self) -> int:
        """How many chunks an earlier attempt had already written (not fetched again)."""
        return self._resumed

    def run(self) -> Path:
        """Fetch the bundle; returns the path of the complete, hash-checked file."""
        offer = self._offer
        self._open_partial()
        shared = topics.bundle_chunks(offer.sha256, offer.chunk_size) if self._fanout else None
        complete, repairs, why = False, 0, ""
        try:
            self._router.target = self._on_chunk
            if shared:  # fan-out only once the broker has granted it: else chunks sent there would be lost
                self._fanout = self._client.subscribe(shared, self._router, qos=CHUNK_QOS, wait=5.0)
                self._connection = self._client.connections
                self._shared = shared
            while True:
                try:
                    self._fetch()
                except StorageError:
                    self.discard()  # a partial file we could not write to is no use, and takes room
                    raise
                if self._digest() == offer.sha256:
                    complete = True
                    break
                if repairs == REPAIRS:
                    why = f" (chunks still arrived damaged after {REPAIRS} repairs)"
                    break
                if not self._drop_damaged():
                    break
                repairs += 1
        finally:
            if shared:  # granted or not: the client would subscribe to it again at every reconnect
                self._client.unsubscribe(shared)
            self._router.target = None
            with self._cond:  # a chunk being handled on the network thread finishes first
                self._closed = True
                if not complete and self._write_error is None:
                    self._save_record()
                self._fh.close()
                os.close(self._record)
        if not complete:
            self.discard()
            raise TransferError("downloaded bundle does not match its SHA-256" + why)
        self.record_path.unlink(missing_ok=True)
        return self._dest

    def discard(self) -> None:
        self._dest.unlink(missing_ok=True)
        self.record_path.unlink(missing_ok=True)

    def _open_partial(self) -> None:
        offer = self._offer
        try:
            record = self.record_path.read_bytes()
        except OSError:
            record = b""
        n = offer.chunk_count
        if len(record) == 5 * n and self._dest.is_file() and self._dest.stat().st_size == offer.size:
            crcs = struct.unpack_from(f">{n}I", record, n)  # n flags, then n CRC-32s
            self._received = {i: crcs[i] for i, have in enumerate(record[:n]) if have}
        else:
            self.discard()
            free = shutil.disk_usage(self._dest.parent).free
            if free < offer.size:
                raise StorageError(self._no_room(free))
            with open(self._dest, "wb") as fh:
                fh.truncate(offer.size)
        self._resumed = len(self._received)
        # Unbuffered: each chunk is one write, and the running hash reads chunks back with pread.
        self._fh = open(self._dest, "r+b", buffering=0)
        self._reserve()
        self._record = os.open(self.record_path, os.O_RDWR | os.O_CREAT, 0o644)
        self._saved_at = time.monotonic()

    def _no_room(self, free: int) -> str:
        return f"not enough disk space: the bundle needs {size_text(self._offer.size)}, {size_text(free)} are free"

    def _reserve(self) -> None:
        """Allocate the partial file's blocks now (those an earlier attempt left as holes too), so
        that its chunks' writes cannot find the disk full."""
        try:
            os.posix_fallocate(self._fh.fileno(), 0, self._offer.size)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:  # a file system that cannot reserve: writes will tell
                return
            self._fh.close()
            self.discard()
            raise StorageError(self._no_room(shutil.disk_usage(self._dest.parent).free)) from None

    def _save_record(self) -> None:
        """Note which chunks were written and their CRC-32s, over the record in place (always
        5 bytes a chunk long: a record of another length is not read)."""
        n = self._offer.chunk_count
        flags = bytes(1 if i in self._received else 0 for i in range(n))
        crcs = struct.pack(f">{n}I", *(self._received.get(i, 0) for i in range(n)))
        self._saved_at = time.monotonic()
        try:
            os.pwrite(self._record, flags + crcs, 0)
        except OSError as exc:  # a hint only: without it a resumed download fetches more again
            log.warning("cannot save which chunks of %s arrived: %s", self._offer.sha256[:12], exc)

    def _fetch(self) -> None:
        total = self._offer.chunk_count
        with self._cond:
            while len(self._received) < total:
                now = time.monotonic()
                if self._write_error is not None:
                    raise StorageError(f"cannot write the download: {self._write_error.strerror or self._write_error}")
                if now - self._last_progress > self._stall_timeout:
                    raise TransferTimeout(f"no chunk arrived for {self._stall_timeout:g}s "
                                          f"({len(self._received)}/{total} received"
                                          + ("" if self._client.connected else "; not connected to the broker")
                                          + ")")
                self._ask(now)  # the first window, and chunks whose answer is overdue
                self._cond.wait(0.5)

    def _ask(self, now: float) -> None:
        """Request what is due; and once a publish on the shared topic has reached us, say so, even
        with nothing to ask for (call with the condition held)."""
        wanted, again = self._asks.due(now, self._last_progress, self._received)
        self.asked_again += again
        self._router.asked_again += again
        if not wanted and not self._tell_seen:
            return
        if self._fanout and self._client.connections != self._connection:
            # Reconnected: what was fanned out meanwhile never reached us. As a new session the
            # server takes this device for one that began listening now, and answers its asks
            # for those chunks (as the same session, it would wait for each to be asked twice).
            self._session, self._connection = os.urandom(4).hex(), self._client.connections
            self._seen, self._tell_seen = None, False
            if not wanted:
                return
        self._asks.asked(wanted, now)
        request = ChunkRequest(self._device_id, tuple(wanted), self._offer.chunk_size, self._fanout,
                               self._session if self._fanout else None, self._seen if self._fanout else None)
        self._tell_seen = False
        self._asked_on = self._client.connections
        self._client.publish(topics.chunk_request(self._offer.sha256), request.to_payload(), qos=1)

    def _connection_held(self) -> bool:
        """Our last request went out on the connection we are still on."""
        return self._client.connected and self._client.connections == self._asked_on

    def _hash_forward(self, index: int, data) -> None:
        """Extend the running hash over every chunk now contiguous from the start (condition held)."""
        while self._hashed in self._received:
            if self._hashed == index:
                block = data
            else:
                block = self._chunk_at(self._hashed)
            self._hasher.update(block)
            self._hashed += 1

    def _chunk_at(self, index: int) -> bytes:
        offer = self._offer
        start = index * offer.chunk_size
        return os.pread(self._fh.fileno(), min(offer.chunk_size, offer.size - start), start)

    def _drop_damaged(self) -> bool:
        """After the file's hash failed: forget the chunks whose data on disk does not match the
        CRC-32 their message carried, so that they are fetched again. False if none is found
        (every chunk is what its sender meant: the sender's file is not the offered bundle)."""
        with self._cond:
            damaged = {i for i, crc in self._received.items() if zlib.crc32(self._chunk_at(i)) != crc}
            if not damaged:
                return False
            for i in damaged:
                del self._received[i]
            self._hasher, self._hashed = hashlib.sha256(), 0  # it took the damaged data in
            self._asks.restart()
            self._last_progress = time.monotonic()
        log.warning("bundle %s did not match its SHA-256: %d chunk(s) arrived damaged (%s), fetching them again",
                    self._offer.sha256[:12], len(damaged), ", ".join(map(str, sorted(damaged)[:10]))
                    + (", ..." if len(damaged) > 10 else ""))
        return True

    def _digest(self) -> str:
        """The file's SHA-256: the running hash, finished from the file for what it did not cover."""
        offer = self._offer
        with open(self._dest, "rb") as fh:
            fh.seek(self._hashed * offer.chunk_size)
            for block in iter(lambda: fh.read(1 << 20), b""):
                self._hasher.update(block)
        return self._hasher.hexdigest()

    def _note_seen(self, seq) -> None:
        """A publish on the shared topic reached us: from the lowest such number on, every one did
        (the broker keeps one publisher's order on a topic), which our requests tell the server, so
        that it does not send them again to a device that asked for them just after they went out.
        The first we hear of is told at once (a window that covers the whole bundle asks no more)."""
        if type(seq) is int and seq >= 0 and (self._seen is None or seq < self._seen):
            self._tell_seen = self._seen is None
            self._seen = seq

    def _on_chunk(self, topic: str, payload: bytes) -> None:
        self.messages += 1
        try:
            peeked = Chunk.peek(payload)
            bundle, index = peeked[:2]
            if topic == self._shared and self._fanout:  # (not granted: its requests cannot say it)
                self._note_seen(peeked[2].get("seq"))
            if bundle != self._offer.sha256 or index in self._received:
                self.duplicates += 1  # another device's answer, or one we have: not worth a hash
                return
            chunk = Chunk.from_payload(payload, peeked, check_crc=False)  # see the module's docstring
        except ProtocolError:
            return
        offer = self._offer
        if chunk.bundle_sha256 != offer.sha256 or chunk.index >= offer.chunk_count:
            return
        expected_len = min(offer.chunk_size, offer.size - chunk.index * offer.chunk_size)
        if len(chunk.data) != expected_len:
            return  # a device never writes more (or less) than the offer declared
        with self._cond:
            if self._closed or self._write_error is not None or chunk.index in self._received:
                return
            try:
                os.pwrite(self._fh.fileno(), chunk.data, chunk.index * offer.chunk_size)
            except OSError as exc:  # the download's thread ends it (see _fetch)
                self._write_error = exc
                self._cond.notify_all()
                return
            self._received[chunk.index] = zlib.crc32(chunk.data) if chunk.crc32 is None else chunk.crc32
            self._hash_forward(chunk.index, chunk.data)
            now = time.monotonic()
            self._asks.arrived(chunk.index, now)
            self._last_progress = now
            done = len(self._received) / offer.chunk_count
            if now - self._saved_at >= RECORD_EVERY:
                self._save_record()
            if len(self._received) == offer.chunk_count:
                self._cond.notify_all()
            elif self._asks.free >= self._refill_at or self._tell_seen:
                # Refill the window right here, on the thread the chunk came in on (waking the
                # download's thread would cost a thread switch per chunk), a quarter at a time.
                self._ask(now)
        if self._on_progress is not None:
            self._on_progress(done)
