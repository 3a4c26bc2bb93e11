"""Host side of bundle transfer: answer devices' chunk requests over MQTT."""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path

from device_agent.bundle import sha256_file
from device_agent.errors import ProtocolError
from device_agent.mqtt import MqttClient
from device_agent.protocol import topics
from device_agent.protocol.messages import DEFAULT_CHUNK_SIZE, BundleOffer, Chunk, ChunkRequest

log = logging.getLogger(__name__)


class BundleServer:
    """Serves the bundles it was given to any device that asks for their chunks.

    Requests are handled on a worker thread so that reading files never blocks
    the MQTT network loop.
    """

    def __init__(self, client: MqttClient, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        self._client = client
        self._chunk_size = chunk_size
        self._bundles: dict[str, tuple[Path, BundleOffer]] = {}
        self._requests: queue.Queue[tuple[str, ChunkRequest] | None] = queue.Queue()
        self._worker = threading.Thread(target=self._serve, name="bundle-server", daemon=True)
        self.chunks_sent = 0

    def offer(self, path: Path, name: str, version: str, target: dict | None = None) -> BundleOffer:
        path = Path(path)
        offer = BundleOffer(sha256=sha256_file(path), size=path.stat().st_size,
                            chunk_size=self._chunk_size, name=name, version=version, target=target or None)
        self._bundles[offer.sha256] = (path, offer)
        return offer

    def start(self) -> None:
        self._client.subscribe(topics.ALL_CHUNK_REQUESTS, self._on_request, qos=1)
        self._worker.start()

    def stop(self) -> None:
        self._requests.put(None)
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
        self._requests.put((sha, request))

    def _serve(self) -> None:
        while (item := self._requests.get()) is not None:
            sha, request = item
            path, offer = self._bundles[sha]
            with open(path, "rb") as fh:
                for index in request.chunks:
                    if index >= offer.chunk_count:
                        continue
                    fh.seek(index * offer.chunk_size)
                    chunk = Chunk(sha, index, fh.read(offer.chunk_size))
                    self._client.publish(topics.chunks(request.device_id), chunk.to_payload(), qos=1)
                    self.chunks_sent += 1
