"""The ingest: subscribes to every device's status, telemetry and events and stores them."""

from __future__ import annotations

import logging
import time

from device_agent.errors import ProtocolError
from device_agent.mqtt import MqttClient
from device_agent.protocol import topics
from device_agent.protocol.messages import DeploymentEvent, DeviceStatus, TelemetryBatch, TelemetrySample
from host_tools.fleet.store import FleetStore

log = logging.getLogger(__name__)


class Ingest:
    def __init__(self, client: MqttClient, store: FleetStore) -> None:
        self._client = client
        self.store = store
        self.rejected = 0

    def start(self) -> None:
        self._client.subscribe(topics.all_devices("status"), self._on_status, qos=1)
        self._client.subscribe(topics.all_devices("telemetry"), self._on_telemetry, qos=1)
        self._client.subscribe(topics.all_devices("events"), self._on_event, qos=1)

    def _decode(self, topic: str, payload: bytes, cls):
        """Decode a per-device message and check it speaks for the device whose topic it came on."""
        try:
            message = cls.from_payload(payload)
        except ProtocolError as exc:
            self.rejected += 1
            log.warning("dropping malformed message on %s: %s", topic, exc)
            return None
        if message.device_id != topics.device_of(topic):
            self.rejected += 1
            log.warning("dropping message on %s that claims to be from %s", topic, message.device_id)
            return None
        return message

    def _on_status(self, topic: str, payload: bytes) -> None:
        if payload and (status := self._decode(topic, payload, DeviceStatus)):
            self.store.record_status(status, time.time())

    def _on_telemetry(self, topic: str, payload: bytes) -> None:
        # Agents send batches (what they queued, oldest first); a single sample is still understood.
        batch = b'"telemetry_batch"' in payload[:64]
        if message := self._decode(topic, payload, TelemetryBatch if batch else TelemetrySample):
            now = time.time()
            for sample in (message.samples if batch else (message,)):
                self.store.record_telemetry(sample, now)

    def _on_event(self, topic: str, payload: bytes) -> None:
        if event := self._decode(topic, payload, DeploymentEvent):
            self.store.record_event(event)
