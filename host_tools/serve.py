"""Host side of bundle transfer: answer devices' chunk requests over MQTT.

A request names the bundle (in its topic), the chunk indices, the chunk size the device cut the
bundle into, and whether the device listens on the bundle's shared chunk topic (fan-out).
``host_tools.fanout`` decides where each chunk goes: once to the shared topic, which the broker
delivers to every device fetching the bundle, or to the asking device's own topic; this module
reads the chunks and publishes them.

Answers are published with back-pressure: past MAX_UNACKED unacknowledged messages they wait for
the broker, in the order their requests came, except that a device none of whose answers went out
for STARVE_S seconds gets its next one first (``answer_queue``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from device_agent.bundle import Manifest
from device_agent.errors import ProtocolError
from device_agent.mqtt import MqttClient
from device_agent.protocol import topics
from device_agent.protocol.chunks import DEFAULT_CHUNK_SIZE, BundleOffer, Chunk, ChunkRequest
from host_tools.answer_queue import AnswerQueue, direct_answers
from host_tools.fanout import FanoutPolicy

log = logging.getLogger(__name__)
MAX_QUEUED_ANSWERS = 200_000
INLINE_CHUNKS = 16  # answers this small are published on the network thread (see _answer)
# Chunks on their way to the broker (published, not acknowledged) past which answers wait on the
# worker thread until the broker has caught up. Without a bound, hundreds of devices asking while
# the broker is busy grow the host's queue without limit (and run paho out of its 65,535 message ids).
MAX_UNACKED = 512


@dataclass
class ServerStats:
    requests: int = 0
    chunks_sent: int = 0
    bytes_sent: int = 0
    fanout_chunks: int = 0        # published once to a shared topic
    fanout_saved: int = 0         # asked for, but just published to the shared topic: not sent again
    waited_s: float = 0.0         # time answers waited for the broker to acknowledge (MAX_UNACKED)
    dropped: int = 0              # answers not sent: MAX_QUEUED_ANSWERS were waiting already
    devices: set[str] = field(default_factory=set)


class BundleServer:
    """Serves the bundles it was given to any device that asks for their chunks.

    Small requests (a device refilling its window as chunks arrive) are answered on the MQTT
    network thread; larger ones on a worker thread, so that reading many chunks never holds up
    the network loop.
    """

    def __init__(self, client: MqttClient, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        self._client = client
        self._chunk_size = chunk_size
        self._bundles: dict[str, tuple[Path, BundleOffer]] = {}
        self._answers = AnswerQueue(MAX_QUEUED_ANSWERS)  # for the worker
        self._dropped_logged = 0.0
        self._worker = threading.Thread(target=self._serve, name="bundle-server", daemon=True)
        self._lock = threading.Lock()
        self._answering = threading.Lock()  # held while the network thread answers a request
        self._stopped = False
        self._files: dict[str, int] = {}  # bundle sha -> open fd, read with pread from any thread
        self._digests: dict[tuple[str, int, int], int] = {}  # (sha, chunk size, index) -> chunk CRC-32
        # Each publish to a shared topic carries a number (seq), in the order the broker gets them; a
        # download says the lowest it received (ChunkRequest.seen): it was listening at every publish since.
        self._seq = 0
        self._seq_lock = threading.Lock()  # numbered and handed to paho in one step: numbers keep their order
        self._downloads_seen: set[tuple] = set()  # (sha, device, session): logged when it first asks
        self.stats = ServerStats()
        self._fanout = FanoutPolicy(self.stats, self._offered, self._backlogged)

    @property
    def chunks_sent(self) -> int:
        return self.stats.chunks_sent

    def offer(self, path: Path, name: str, version: str, target: dict | None = None, *,
              unpacked_size: int | None = None) -> BundleOffer:
        """Serve *path*; it is read once here, for its SHA-256 and every chunk's CRC-32 (which
        serving would otherwise compute while devices wait)."""
        path = Path(path)
        sha, crcs = digest_chunks(path, self._chunk_size)
        offer = BundleOffer(sha256=sha, size=path.stat().st_size, chunk_size=self._chunk_size, name=name,
                            version=version, target=target or None, unpacked_size=unpacked_size)
        with self._lock:
            self._digests.update(((sha, self._chunk_size, i), crc) for i, crc in enumerate(crcs))
        self._bundles[offer.sha256] = (path, offer)
        return offer

    def offer_bundle(self, path: Path, manifest: Manifest) -> BundleOffer:
        """Serve the bundle file *path*, whose manifest is *manifest*."""
        return self.offer(path, manifest.name, manifest.version, manifest.target, unpacked_size=manifest.unpacked_size)

    def withdraw(self, sha256: str) -> None:
        self._bundles.pop(sha256, None)
        with self._lock:
            fd = self._files.pop(sha256, None)
            self._digests = {k: v for k, v in self._digests.items() if k[0] != sha256}
        if fd is not None:
            os.close(fd)

    def start(self) -> None:
        self._client.subscribe(topics.ALL_CHUNK_REQUESTS, self._on_request, qos=1)
        self._worker.start()

    def stop(self) -> None:
        """Stop answering; the bundles' files are closed once no answer is being read from them (a
        request the network thread is answering finishes first: a file closed under it would be
        "Bad file descriptor", or, its number taken by a file opened since, another file's bytes)."""
        self._stopped = True
        self._client.unsubscribe(topics.ALL_CHUNK_REQUESTS)
        self._answers.close()
        self._worker.join(timeout=5)
        with self._answering, self._lock:
            for fd in self._files.values():
                os.close(fd)
            self._files.clear()

    def _on_request(self, topic: str, payload: bytes) -> None:
        with self._answering:
            if not self._stopped:
                self._answer(topic, payload)

    def _answer(self, topic: str, payload: bytes) -> None:
        sha = topic.split("/")[-2]
        if sha not in self._bundles:
            return
        try:
            request = ChunkRequest.from_payload(payload)
        except ProtocolError as exc:
            log.warning("ignoring malformed chunk request: %s", exc)
            return
        if not topics.valid_device_id(request.device_id):
            return
        job = self._plan(sha, request)  # decided at once, on the network thread: it is cheap
        if job is None:
            return
        if len(job[3]) <= INLINE_CHUNKS and not self._answers and self._client.unacked < MAX_UNACKED:
            # A window's refill: published on the network thread, as a hand-off to the worker would
            # cost a thread switch (up to Python's 5 ms switch interval) per request.
            try:
                self._publish(*job)
            except OSError as exc:  # the file went away or cannot be read: the device will time out
                log.error("cannot serve %s: %s", sha[:12], exc)
            return
        self._fanout.queued(direct_answers(job))
        if not self._answers.put(job):  # full: the device asks again after its retry time
            self._fanout.sent(direct_answers(job))
            self.stats.dropped += 1
            if time.monotonic() - self._dropped_logged > 10:
                self._dropped_logged = time.monotonic()
                log.warning("the broker is not keeping up: %d chunk answers dropped so far (devices ask again)",
                            self.stats.dropped)

    def _fd(self, sha: str, path: Path) -> int:
        with self._lock:
            fd = self._files.get(sha)
            if fd is None:
                fd = self._files[sha] = os.open(path, os.O_RDONLY)
            return fd

    def _serve(self) -> None:
        while True:
            job = self._answers.get(timeout=0.1)  # and publish the fan-outs that are due
            if job is None:
                return
            try:
                if job:
                    try:
                        self._publish(*job)
                    finally:
                        self._fanout.sent(direct_answers(job))
                for sha, chunk_size, plan in self._fanout.due():
                    entry = self._bundles.get(sha)
                    if entry is not None:
                        self._publish(sha, entry[0], chunk_size, plan)
            except OSError as exc:  # the file went away or cannot be read: the device will time out
                log.error("cannot serve: %s", exc)
            except Exception:  # noqa: BLE001 - a failed answer is asked for again; a dead worker answers nothing
                log.exception("answering a chunk request failed")

    def _plan(self, sha: str, request: ChunkRequest) -> tuple[str, Path, int, list[tuple[int, str]]] | None:
        """What to publish for *request*: (sha, path, chunk size, [(index, topic)]), or None."""
        entry = self._bundles.get(sha)
        if entry is None:
            return None
        path, offer = entry
        chunk_size = request.chunk_size or offer.chunk_size
        with self._lock:
            self.stats.requests += 1
            self.stats.devices.add(request.device_id)
            download = (sha, request.device_id, request.session)
            if download not in self._downloads_seen:
                if len(self._downloads_seen) >= 100_000:
                    self._downloads_seen.clear()
                self._downloads_seen.add(download)
                log.info("%s is fetching %s %s (%d-byte chunks%s)", request.device_id, offer.name, offer.version,
                         chunk_size, ", with the fan-out" if request.fanout else "")
        plan = self._fanout.plan(offer, request)
        return (sha, path, chunk_size, plan) if plan else None

    def _offered(self, sha: str) -> BundleOffer | None:
        entry = self._bundles.get(sha)
        return entry[1] if entry else None

    def _backlogged(self) -> bool:
        """Answers queue up: a quarter of MAX_UNACKED are on their way to the broker."""
        return self._client.unacked >= MAX_UNACKED // 4

    def _publish(self, sha: str, path: Path, chunk_size: int, plan: list[tuple[int, str]]) -> None:
        """Read, and publish each (index, topic) of *plan* (never under the lock); on the worker,
        wait while MAX_UNACKED messages are on their way to the broker."""
        stats = self.stats
        sent = count = 0
        fd = self._fd(sha, path)
        on_worker = threading.current_thread() is self._worker
        shared = topics.bundle_chunks(sha, chunk_size)
        for index, topic in plan:
            if self._stopped:  # (its files are about to close)
                break
            if on_worker and self._client.unacked >= MAX_UNACKED:  # (the network thread never waits)
                began = time.monotonic()
                while self._client.unacked >= MAX_UNACKED and self._client.connected and not self._stopped:
                    time.sleep(0.002)
                stats.waited_s += time.monotonic() - began
            data = os.pread(fd, chunk_size, index * chunk_size)
            key = (sha, chunk_size, index)
            digest = self._digests.get(key)
            if digest is None:  # a chunk size other than the offer's: computed once, however many fetch it
                digest = self._digests[key] = zlib.crc32(data)
            if topic == shared:
                with self._seq_lock:
                    self._seq += 1
                    self._fanout.published(key, self._seq)
                    self._client.publish(topic, Chunk(sha, index, data).to_payload(digest, self._seq), qos=1)
            else:
                self._client.publish(topic, Chunk(sha, index, data).to_payload(digest), qos=1)
            sent += len(data)
            count += 1
        with self._lock:
            stats.chunks_sent += count
            stats.bytes_sent += sent


def digest_chunks(path: Path, chunk_size: int) -> tuple[str, list[int]]:
    """The file's SHA-256 and the CRC-32 of each *chunk_size* piece, in one read."""
    whole, crcs = hashlib.sha256(), []
    with open(path, "rb", buffering=0) as fh:
        for block in iter(lambda: fh.read(chunk_size), b""):
            whole.update(block)
            crcs.append(zlib.crc32(block))
    return whole.hexdigest(), crcs
