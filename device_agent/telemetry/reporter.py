"""Reporting telemetry: every interval the collectors are read and the sample is queued, connected
or not (``queue.TelemetryQueue``); what is queued goes to the broker oldest first, in batches,
each leaving the queue once the broker acknowledged it — after each interval's sample, and at once
after every reconnection."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable

from device_agent.config import AgentConfig
from device_agent.errors import MqttError, StorageError
from device_agent.mqtt import MqttClient
from device_agent.protocol import topics
from device_agent.protocol.reports import TelemetryBatch, TelemetrySample
from device_agent.serving import ModelSlot
from device_agent.telemetry import TelemetryCollectors
from device_agent.telemetry.queue import TelemetryQueue

log = logging.getLogger(__name__)
TELEMETRY_BATCH = 50  # samples per telemetry message when catching up after an outage


class TelemetryReporter:
    """The agent's telemetry: *config()* is read afresh each interval (the host may change the
    interval), *slot* says which bundle is serving, *stop* ends the loop."""

    def __init__(self, state_root: Path, config: Callable[[], AgentConfig], client: MqttClient,
                 collectors: TelemetryCollectors, slot: ModelSlot, stop: threading.Event) -> None:
        self._config, self._client, self._collectors, self._slot, self._stop = config, client, collectors, slot, stop
        self.queue = TelemetryQueue(state_root / "telemetry.db", config().telemetry_queue_max)
        self._adopt_old_sequence(state_root / "telemetry.seq")
        self._sending = threading.Lock()  # one sender at a time: the loop, or a reconnection's catch-up
        # Samples queued while the broker was away go out at once, not at the next interval (on a
        # thread of their own: waiting for acknowledgements on the network thread would hang it).
        client.on_connected(lambda: threading.Thread(target=self.send_queued, name="telemetry-catch-up",
                                                     daemon=True).start())

    def _adopt_old_sequence(self, old: Path) -> None:
        # Agents before the queue kept the last sequence number in telemetry.seq; carry on after
        # it, or the host would take new samples for ones it already has.
        try:
            self.queue.continue_after(int(old.read_text()))
            old.unlink()
        except (OSError, ValueError, StorageError):  # (a full disk: at the next start)
            pass

    def run(self) -> None:
        """Every interval: measure, queue (connected or not), and send what is queued."""
        while not self._stop.wait(interval := self._config().telemetry_interval):
            bundle = self._slot.bundle
            readings = self._collectors.collect()
            readings["queue"] = self.queue.stats()  # what is waiting, and what was ever dropped
            losing = self.queue.losing  # said once, when it starts and when it ends
            try:
                self.queue.put({"device_id": self._config().device_id, "timestamp": time.time(),
                                "interval_s": interval, "bundle": bundle.label if bundle else None,
                                "readings": readings})
                if losing:
                    log.info("telemetry is queued again (the samples lost meanwhile are counted as dropped)")
            except StorageError as exc:  # a full disk: measure on, and queue again once there is room
                if not losing:
                    log.warning("%s; samples are lost until there is room", exc)
            self.send_queued()

    def send_queued(self) -> None:
        """Publish queued samples oldest first, in batches; each leaves the queue once acknowledged."""
        with self._sending:
            self._send_batches()

    def _send_batches(self) -> None:
        device = self._config().device_id
        while self._client.connected and not self._stop.is_set():
            samples = self.queue.oldest(TELEMETRY_BATCH)
            if not samples:
                return
            batch = TelemetryBatch(device, tuple(TelemetrySample.from_dict(s) for s in samples))
            try:
                self._client.publish(topics.telemetry(device), batch.to_payload(), qos=1, wait=10.0)
            except MqttError as exc:  # not acknowledged: they stay queued and go again later
                log.warning("telemetry not sent yet (%d queued): %s", self.queue.stats()["pending"], exc)
                return
            try:
                self.queue.remove_through(samples[-1]["seq"])
            except StorageError as exc:  # sent, but still queued: they go again with the next interval's
                log.warning("%s", exc)
                return
