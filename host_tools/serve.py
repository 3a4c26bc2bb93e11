"""Host side of bundle transfer: answer devices' chunk requests over MQTT.

A request names the bundle (in its topic), the chunk indices, the chunk size the device cut the
bundle into, and whether the device listens on the bundle's shared chunk topic (fan-out). A
fan-out answer is published once to that topic and the broker delivers it to every device
fetching the bundle; the same chunk is not published there again within FANOUT_REPEAT seconds,
however many devices ask for it (a device that missed it asks again after its retry time).
Other answers go to the asking device's own chunk topic.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from device_agent.bundle import sha256_file
from device_agent.errors import ProtocolError
from device_agent.mqtt import MqttClient
from device_agent.protocol import topics
from device_agent.protocol.messages import DEFAULT_CHUNK_SIZE, BundleOffer, Chunk, ChunkRequest

log = logging.getLogger(__name__)
FANOUT_REPEAT = 1.0  # seconds before the same chunk is published to a bundle's shared topic again
MAX_QUEUED_REQUESTS = 10_000


@dataclass
class ServerStats:
    requests: int = 0
    chunks_sent: int = 0
    bytes_sent: int = 0
    fanout_chunks: int = 0        # published once to a shared topic
    fanout_saved: int = 0         # asked for, but just published to the shared topic: not sent again
    devices: set[str] = field(default_factory=set)


class BundleServer:
    """Serves the bundles it was given to any device that asks for their chunks.

    Requests are handled on a worker thread so that reading files never blocks
    the MQTT network loop.
    """

    def __init__(self, client: MqttClient, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        self._client = client
        self._chunk_size = chunk_size
        self._bundles: dict[str, tuple[Path, BundleOffer]] = {}
        self._requests: queue.Queue[tuple[str, ChunkRequest] | None] = queue.Queue(MAX_QUEUED_REQUESTS)
        self._worker = threading.Thread(target=self._serve, name="bundle-server", daemon=True)
        self._fanned_out: dict[tuple[str, int, int], float] = {}
        self.stats = ServerStats()

    @property
    def chunks_sent(self) -> int:
        return self.stats.chunks_sent

    def offer(self, path: Path, name: str, version: str, target: dict | None = None) -> BundleOffer:
        path = Path(path)
        offer = BundleOffer(sha256=sha256_file(path), size=path.stat().st_size,
                            chunk_size=self._chunk_size, name=name, version=version, target=target or None)
        self._bundles[offer.sha256] = (path, offer)
        return offer

    def withdraw(self, sha256: str) -> None:
        self._bundles.pop(sha256, None)

    @property
    def bundles(self) -> dict[str, Path]:
        return {sha: path for sha, (path, _) in self._bundles.items()}

    def start(self) -> None:
        self._client.subscribe(topics.ALL_CHUNK_REQUESTS, self._on_request, qos=1)
        self._worker.start()

    def stop(self) -> None:
        self._client.unsubscribe(topics.ALL_CHUNK_REQUESTS)
        try:
            self._requests.put_nowait(None)
        except queue.Full:
            pass
        self._worker.join(timeout=5)

    def _on_request(self, topic: str, payload: bytes) -> None:
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
        try:
            self._requests.put_nowait((sha, request))
        except queue.Full:  # the device asks again after its retry time
            log.warning("chunk request queue is full; dropping a request from %s", request.device_id)

    def _serve(self) -> None:
        while (item := self._requests.get()) is not None:
            sha, request = item
            try:
                self._answer(sha, request)
            except OSError as exc:  # the file went away or cannot be read: the device will time out
                log.error("cannot serve %s: %s", sha[:12], exc)

    def _answer(self, sha: str, request: ChunkRequest) -> None:
        entry = self._bundles.get(sha)
        if entry is None:
            return
        path, offer = entry
        chunk_size = request.chunk_size or offer.chunk_size
        count = max(1, -(-offer.size // chunk_size))
        stats = self.stats
        stats.requests += 1
        stats.devices.add(request.device_id)
        now = time.monotonic()
        with open(path, "rb") as fh:
            for index in request.chunks:
                if index >= count:
                    continue
                if request.fanout:
                    key = (sha, chunk_size, index)
                    if now - self._fanned_out.get(key, -FANOUT_REPEAT) < FANOUT_REPEAT:
                        stats.fanout_saved += 1
                        continue
                    self._fanned_out[key] = now
                    topic = topics.bundle_chunks(sha, chunk_size)
                    stats.fanout_chunks += 1
                else:
                    topic = topics.chunks(request.device_id)
                fh.seek(index * chunk_size)
                data = fh.read(chunk_size)
                self._client.publish(topic, Chunk(sha, index, data).to_payload(), qos=1)
                stats.chunks_sent += 1
                stats.bytes_sent += len(data)
        if len(self._fanned_out) > 100_000:  # forget chunks published long ago
            self._fanned_out = {k: t for k, t in self._fanned_out.items() if now - t < FANOUT_REPEAT}
