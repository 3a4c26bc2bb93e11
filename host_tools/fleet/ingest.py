"""The ingest: subscribes to every device's status, telemetry and events and stores them."""

from __future__ import annotations

import logging
import sqlite3
import time
from typing import Callable

from device_agent.errors import ProtocolError
from device_agent.mqtt import MqttClient
from device_agent.protocol import topics
from device_agent.protocol.reports import DeploymentEvent, DeviceStatus, TelemetryBatch, TelemetrySample
from host_tools.fleet.store import FleetStore

log = logging.getLogger(__name__)


class Ingest:
    """Stores what devices report. With *share*, telemetry and events come through the MQTT shared
    subscription group of that name: several ingests (processes, machines) then split the load,
    each message going to one of them. Status is not shared: every ingest keeps every device's."""

    def __init__(self, client: MqttClient, store: FleetStore, *, share: str | None = None) -> None:
        self._client = client
        self.store = store
        self.rejected = 0
        self.samples = 0
        self.unstored = 0  # messages the database could not take (a full disk), since the last it took
        self._prefix = f"$share/{share}/" if share else ""

    def start(self) -> None:
        self._client.subscribe(topics.all_devices("status"), self._on_status, qos=1)
        self._client.subscribe(self._prefix + topics.all_devices("telemetry"), self._on_telemetry, qos=1)
        self._client.subscribe(self._prefix + topics.all_devices("events"), self._on_event, qos=1)

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

    def _stored(self, write: Callable[[], int | None]) -> int:
        """Run one write to the database. One that fails (a full disk) drops the message and is
        said once, not once per message, until the database takes writes again."""
        try:
            written = write() or 0
        except sqlite3.Error as exc:
            if not self.unstored:
                log.warning("cannot store what devices report (%s): dropping it until the database takes writes "
                            "again", exc)
            self.unstored += 1
            return 0
        if self.unstored:
            log.warning("storing again; %d message(s) from devices were dropped meanwhile", self.unstored)
            self.unstored = 0
        return written

    def _on_status(self, topic: str, payload: bytes) -> None:
        if payload and (status := self._decode(topic, payload, DeviceStatus)):
            self._stored(lambda: self.store.record_status(status, time.time()))

    def _on_telemetry(self, topic: str, payload: bytes) -> None:
        # Agents send batches (what they queued, oldest first); a single sample is still understood.
        batch = b'"telemetry_batch"' in payload[:64]
        if message := self._decode(topic, payload, TelemetryBatch if batch else TelemetrySample):
            samples = list(message.samples if batch else (message,))
            self.samples += self._stored(lambda: self.store.record_telemetry_many(samples, time.time()))

    def _on_event(self, topic: str, payload: bytes) -> None:
        if event := self._decode(topic, payload, DeploymentEvent):
            self._stored(lambda: self.store.record_event(event))
