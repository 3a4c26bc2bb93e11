"""The device agent: announce, take deploy commands, serve the active model, report telemetry."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time

from device_agent import __version__
from device_agent.bundle.signing import trusted_keys
from device_agent.config import AgentConfig
from device_agent.errors import EdgefleetError, MqttError, ProtocolError
from device_agent.mqtt import MqttClient, Will
from device_agent.protocol import topics
from device_agent.protocol.messages import DeployCommand, DeploymentEvent, DeviceStatus, TelemetrySample
from device_agent.runtime import load_runtime
from device_agent.sample import load_sample
from device_agent.serving import ModelSlot, SampleWorkload
from device_agent.store import BundleStore
from device_agent.telemetry import CollectorContext, TelemetryCollectors
from device_agent.telemetry.histogram import LatencyHistogram
from device_agent.transfer import ChunkRouter
from device_agent.update import UpdateContext, deploy

log = logging.getLogger(__name__)


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.keys = trusted_keys(config.trusted_keys)
        self.store = BundleStore(config.state_dir)
        self.latency = LatencyHistogram()
        self.slot = ModelSlot(self.latency)
        self._stop = threading.Event()
        self._commands: queue.Queue[DeployCommand] = queue.Queue()
        self._seen_commands: set[str] = set()
        self._seq_file = self.store.root / "telemetry.seq"
        self._seq = self._load_seq()
        self._chunks = ChunkRouter()
        offline = DeviceStatus(config.device_id, online=False, timestamp=0.0, agent_version=__version__)
        self.client = MqttClient(client_id=f"edgefleet-agent-{config.device_id}", broker=config.broker,
                                 will=Will(topics.status(config.device_id), offline.to_payload()))
        self._collectors = TelemetryCollectors(CollectorContext(latency=self.latency,
                                                                errors=lambda: self.slot.errors))

    # -- life cycle -------------------------------------------------------------------
    def run(self) -> None:
        """Run until stop() is called (SIGTERM/SIGINT in the CLI)."""
        self._restore_active()
        self.client.subscribe(topics.command(self.config.device_id), self._on_command, qos=1)
        self.client.subscribe(topics.chunks(self.config.device_id), self._chunks, qos=1)
        # After a dropped connection the broker has published our last will (offline);
        # announce again on every reconnect, not only the first connect.
        self.client.on_connected(lambda: self._publish_status(online=True))
        self.client.connect()
        log.info("agent %s connected to %s", self.config.device_id, self.config.broker)
        threads = [
            SampleWorkload(self.slot, self.config.inference_interval, self._stop),
            threading.Thread(target=self._telemetry_loop, name="telemetry", daemon=True),
            threading.Thread(target=self._deploy_loop, name="deploy", daemon=True),
        ]
        for t in threads:
            t.start()
        self._stop.wait()
        try:
            self._publish_status(online=False)
        except MqttError as exc:  # the broker may be gone; its last will says offline for us
            log.warning("could not announce going offline: %s", exc)
        self.client.disconnect()

    def stop(self) -> None:
        self._stop.set()

    def _restore_active(self) -> None:
        active = self.store.active()
        if active is None:
            return
        try:
            runtime = load_runtime(active.manifest.runtime, active.files / active.manifest.model_file,
                                   threads=self.config.runtime_threads)
            sample, _ = load_sample(active.files / active.manifest.sample.file)
        except EdgefleetError as exc:
            log.error("cannot load the active bundle %s: %s", active.label, exc)
            return
        self.slot.swap(active, runtime, sample)
        log.info("serving %s", active.label)

    # -- messages ---------------------------------------------------------------------
    def _publish_status(self, *, online: bool) -> None:
        bundle = self.slot.bundle
        status = DeviceStatus(self.config.device_id, online=online, timestamp=time.time(),
                              agent_version=__version__,
                              active_bundle=bundle.label if bundle else None,
                              active_sha256=bundle.sha256 if bundle else None)
        self.client.publish(topics.status(self.config.device_id), status.to_payload(), qos=1, retain=True,
                            wait=5.0 if not online else None)

    def _on_command(self, topic: str, payload: bytes) -> None:
        try:
            command = DeployCommand.from_payload(payload)
        except ProtocolError as exc:
            log.warning("ignoring malformed command: %s", exc)
            return
        if command.command_id in self._seen_commands:
            return  # at-least-once delivery: a redelivered command is done already
        self._seen_commands.add(command.command_id)
        self._commands.put(command)

    def _emit(self, event: DeploymentEvent) -> None:
        self.client.publish(topics.events(self.config.device_id), event.to_payload(), qos=1)

    # -- workers ----------------------------------------------------------------------
    def _deploy_loop(self) -> None:
        ctx = UpdateContext(self.config.device_id, self.client, self._chunks, self.store, self.slot,
                            self.keys, self._emit,
                            chunk_window=self.config.chunk_window,
                            stall_timeout=self.config.download_stall_timeout,
                            runtime_threads=self.config.runtime_threads)
        while not self._stop.is_set():
            try:
                command = self._commands.get(timeout=0.5)
            except queue.Empty:
                continue
            final = deploy(ctx, command)
            if final.state == "active":
                self._publish_status(online=True)

    def _load_seq(self) -> int:
        try:
            return int(self._seq_file.read_text())
        except (OSError, ValueError):
            return 0

    def _next_seq(self) -> int:
        # The host stores samples keyed by (device, seq): the sequence must survive restarts,
        # or a restarted agent's samples would be dropped as duplicates.
        self._seq += 1
        tmp = self._seq_file.with_suffix(".tmp")
        tmp.write_text(str(self._seq))
        os.replace(tmp, self._seq_file)
        return self._seq

    def _telemetry_loop(self) -> None:
        interval = self.config.telemetry_interval
        while not self._stop.wait(interval):
            seq = self._next_seq()
            bundle = self.slot.bundle
            sample = TelemetrySample(self.config.device_id, seq, time.time(), interval,
                                     bundle.label if bundle else None, self._collectors.collect())
            self.client.publish(topics.telemetry(self.config.device_id), sample.to_payload(), qos=1)
