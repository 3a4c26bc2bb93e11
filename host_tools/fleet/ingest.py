"""The ingest: subscribes to every device's status, telemetry and events and stores them."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import deque
from typing import Callable

from device_agent.errors import ProtocolError
from device_agent.mqtt import MqttClient
from device_agent.protocol import topics
from device_agent.protocol.reports import DeploymentEvent, DeviceStatus, TelemetryBatch, TelemetrySample
from host_tools.fleet.store import FleetStore

log = logging.getLogger(__name__)

RETRY_INTERVAL = 2.0  # seconds between tries to store what waits, while the database takes no writes
MAX_HELD = 1000  # messages kept waiting in memory; a broker sends no more than its in-flight limit (20)
# A write that fails for the data it carries (NaN stored as NULL in a NOT NULL column, an integer past
# 64 bits), not for the database: no retry would store it.
REFUSED_DATA = (sqlite3.IntegrityError, OverflowError)


class Ingest:
    """Stores what devices report. With *share*, telemetry and events come through the MQTT shared
    subscription group of that name: several ingests (processes, machines) then split the load,
    each message going to one of them. Status is not shared: every ingest keeps every device's.

    When the database takes no writes (a full disk), a client made with held_acks keeps what arrives
    unacknowledged, in order, and tries again every RETRY_INTERVAL: the broker sends no more than its
    in-flight limit meanwhile and keeps the rest in the session, so nothing devices reported is lost
    (up to the broker's queue limit). Another client's messages are dropped, and counted."""

    def __init__(self, client: MqttClient, store: FleetStore, *, share: str | None = None) -> None:
        self._client = client
        self.store = store
        self.rejected = 0
        self.samples = 0
        self.unstored = 0  # messages the database could not take (a full disk), since the last it took
        self.dropped = 0  # of those, the ones given up on (no held acknowledgements, or too many waiting)
        self._said = False  # that the database takes no writes
        self._prefix = f"$share/{share}/" if share else ""
        self._order = threading.Lock()  # writes, in the order messages came
        self._waiting: deque[tuple[Callable[[], int | None], Callable[[], None]]] = deque()
        self._retrying: threading.Thread | None = None
        client.on_connected(self._forget_waiting)

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

    def _stored(self, write: Callable[[], int | None]) -> None:
        """Run one write to the database, or keep it waiting behind those that wait already. One that
        fails (a full disk) is said once, not once per message, until the database takes writes again."""
        with self._order:
            if not self._waiting:
                try:
                    self._took(write())
                    return
                except REFUSED_DATA as exc:  # the message, not the database: held, it would hold up all after it
                    self._bad(exc)
                    return
                except sqlite3.Error as exc:
                    if not self._said:
                        self._said = True
                        log.warning("cannot store what devices report (%s): %s until the database takes writes "
                                    "again", exc, "holding it unacknowledged, and the broker what follows,"
                                    if self._client.held_acks else "dropping it")
            self.unstored += 1
            if not self._client.held_acks or len(self._waiting) >= MAX_HELD:
                self.dropped += 1
                return
            self._waiting.append((write, self._client.hold()))
            if self._retrying is None:
                self._retrying = threading.Thread(target=self._retry, name="ingest-retry", daemon=True)
                self._retrying.start()

    def _bad(self, exc: Exception) -> None:
        self.rejected += 1
        log.warning("dropping a message from a device that the database refuses: %s", exc)

    def _took(self, written: int | None) -> None:
        self.samples += written or 0
        if self._said and not self._waiting:
            if self.dropped:
                log.warning("storing again; %d message(s) from devices were dropped meanwhile", self.dropped)
            else:
                log.warning("storing again; the %d message(s) from devices that waited are stored", self.unstored)
            self.unstored = self.dropped = 0
            self._said = False

    def _retry(self) -> None:
        while True:
            time.sleep(RETRY_INTERVAL)
            with self._order:
                while self._waiting:
                    write, acknowledge = self._waiting[0]
                    try:
                        written = write()
                    except REFUSED_DATA as exc:
                        self._bad(exc)
                        written = None
                    except sqlite3.Error:
                        break
                    self._waiting.popleft()
                    acknowledge()
                    self._took(written)
                if not self._waiting:
                    self._retrying = None
                    return

    def _forget_waiting(self) -> None:
        """After a reconnect the broker sends again what it had not had acknowledged: kept here too, it
        would be stored twice. (A client with held acknowledgements is meant to have a persistent
        session, as the monitor's has; with a clean one the broker would have forgotten them.)"""
        with self._order:
            if self._client.held_acks:
                self.unstored -= len(self._waiting)
                self._waiting.clear()

    def _on_status(self, topic: str, payload: bytes) -> None:
        if payload and (status := self._decode(topic, payload, DeviceStatus)):
            received = time.time()  # when it came, though it may be stored later
            self._stored(lambda: self.store.record_status(status, received))

    def _on_telemetry(self, topic: str, payload: bytes) -> None:
        # Agents send batches (what they queued, oldest first); a single sample is still understood.
        batch = b'"telemetry_batch"' in payload[:64]
        if message := self._decode(topic, payload, TelemetryBatch if batch else TelemetrySample):
            samples, received = list(message.samples if batch else (message,)), time.time()
            self._stored(lambda: self.store.record_telemetry_many(samples, received))

    def _on_event(self, topic: str, payload: bytes) -> None:
        if event := self._decode(topic, payload, DeploymentEvent):
            self._stored(lambda: self.store.record_event(event))
