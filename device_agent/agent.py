"""The device agent: recover, serve the active model locally, take commands, report telemetry."""

from __future__ import annotations

import faulthandler
import logging
import os
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import asdict, replace
from typing import Any, Callable

from device_agent import __version__
from device_agent.bench import benchmark
from device_agent.bundle.signing import trusted_keys
from device_agent.client_cert import ClientCertificate
from device_agent.command_log import CommandLog, ReplyLog
from device_agent.config import AgentConfig, RemoteSettings
from device_agent.errors import (
    ConfigError, EdgefleetError, MqttError, ProtocolError, SignatureError, StorageError,
)
from device_agent.hardware import describe as describe_hardware
from device_agent.local_api import LocalApi
from device_agent.local_api import framing
from device_agent.local_api.http import HttpApi
from device_agent.mqtt import MqttClient, Will, session_client_id
from device_agent.presence import Presence, Seat, StatusGuard, identity
from device_agent.protocol import topics
from device_agent.protocol.commands import (
    ANSWERED, BenchCommand, CertificateCommand, ConfigCommand, DeployCommand, Reply, RollbackCommand, StatusRequest,
    TrustCommand, command_id_of, parse_command,
)
from device_agent.protocol.reports import RIVAL_FIELDS, DeploymentEvent, DeviceStatus
from device_agent.serving import ModelSlot, SampleWorkload
from device_agent.state_lock import StateDirectoryLock
from device_agent.store import BundleStore
from device_agent.systemd import notify, start_watchdog
from device_agent.telemetry import CollectorContext, TelemetryCollectors
from device_agent.telemetry.disk import room
from device_agent.telemetry.histogram import LatencyHistogram
from device_agent.telemetry.reporter import TelemetryReporter
from device_agent.tls import TlsFiles
from device_agent.transfer import CHUNK_QOS, ChunkRouter, Download
from device_agent.trust import TrustStore
from device_agent.update import UpdateContext, UpdateMachine
from device_agent.update.health import health_check

log = logging.getLogger(__name__)
CERTIFICATE_ATTEMPTS = 3  # connections a renewed client certificate may fail before the earlier one is back


class Agent:
    """One device's agent. ``run()`` is the service; ``start()`` and ``shutdown()`` let a host
    process run many (``edgefleet simulate``), which passes a shared *check* (one loaded runtime per
    model for all of them), only the collectors that mean something per device, and no local API."""

    def __init__(self, config: AgentConfig, *, check: Callable = health_check,
                 collectors: list[str] | None = None, local_api: bool = True) -> None:
        # Before anything reads the state directory: an agent already on it keeps it to itself.
        self._state_lock = StateDirectoryLock(config.state_dir)
        self._state_lock.acquire()
        self.settings = RemoteSettings(config)  # what the host changed over MQTT wins over the file
        try:
            config = self.settings.apply(config)
        except ConfigError as exc:  # saved by an older agent with other rules: keep the file's
            log.error("ignoring the remotely changed settings: %s", exc)
        # The client certificate it shows the broker: the configured one, or a renewed one the host sent.
        self.certificate = ClientCertificate(config.tls, config.state_dir, config.device_id)
        self.config = config = replace(config, tls=self.certificate.tls)
        self.keys = TrustStore(config.state_dir, trusted_keys(config.trusted_keys))
        self.store = BundleStore(config.state_dir)
        self.latency = LatencyHistogram()
        self.slot = ModelSlot(self.latency)
        self._stop = threading.Event()
        self._signalled = False  # see on_signal
        self._work: queue.Queue[tuple[Any, Future | None] | None] = queue.Queue()  # None: stop
        self._check = check
        self._commands = CommandLog(config.state_dir)
        self._replies = ReplyLog(config.state_dir)
        self._hardware = describe_hardware(config.sysfs)
        self._chunks = ChunkRouter()
        me = identity()  # this process, as presence and the last will name it
        offline = DeviceStatus(config.device_id, online=False, timestamp=0.0, agent_version=__version__,
                               instance=me["instance"])
        # A persistent session: commands sent while the device is offline wait at the broker.
        self.client = MqttClient(client_id=session_client_id(f"edgefleet-agent-{config.device_id}",
                                                             self.store.root / "mqtt-session"), broker=config.broker,
                                 will=Will(topics.status(config.device_id), offline.to_payload()),
                                 clean_session=False, tls=config.tls,
                                 reconnect_max_delay=config.reconnect_max_delay)
        # One live agent per device id (a cloned SD card has two): see device_agent/presence.py.
        topic, label = topics.presence(config.device_id), f"device id {config.device_id}"
        self.seat = Seat(self.client, topic, label, me=me, tls=lambda: self.config.tls,
                         retry=config.reconnect_max_delay, stop=self._stop)
        self.presence = Presence(self.client, topic, label, me=me,
                                 on_displaced=self.seat.step_back, on_rival=lambda: self._publish_status(online=True))
        self._status_guard = StatusGuard(self.client, topics.status(config.device_id),
                                         lambda: self._publish_status(online=True), self._stop.is_set,
                                         own_will=offline.to_payload())
        self.machine = UpdateMachine(UpdateContext(config, self.client, self._chunks, self.store, self.slot,
                                                   self.keys, self._emit, check))
        self._servers: list[LocalApi | HttpApi] = []
        if local_api:
            self._servers = [
                LocalApi(config.inference_socket, self.slot, mode=0o660, spin_us=config.api_spin_us),
                LocalApi(config.control_socket_path, self.slot, mode=0o600, control={
                    framing.STATUS: self.report, framing.ROLLBACK: self._local_rollback})]
            if config.http_port is not None:
                self._servers.append(HttpApi(config.http_port, self.slot))
        context = CollectorContext(sysfs=config.sysfs, latency=self.latency, errors=lambda: self.slot.errors,
                                   state_dir=config.state_dir)
        self.telemetry = TelemetryReporter(self.store.root, lambda: self.config, self.client,
                                           TelemetryCollectors(context, collectors), self.slot, self._stop)
        self._update_thread: threading.Thread | None = None

    # -- life cycle -------------------------------------------------------------------
    def run(self) -> None:
        """Run until stop() is called, or on_signal (SIGTERM/SIGINT in the CLI)."""
        self.start()
        notify("READY=1")
        start_watchdog(lambda: self._update_thread.is_alive(), self._stop)
        log.info("agent %s up: api %s, broker %s", self.config.device_id, self.config.inference_socket,
                 self.config.broker)
        # Wake up now and then: a SIGTERM the kernel hands to another thread only runs its Python
        # handler when the main thread executes bytecode again, and an untimed wait never does.
        while not (self._signalled or self._stop.wait(0.5)):
            pass
        self.stop()
        log.info("stopping")
        # A shutdown that hangs is a bug worth a report: dump every thread's stack if it takes long.
        faulthandler.dump_traceback_later(8, exit=False)
        notify("STOPPING=1")
        self.shutdown()
        faulthandler.cancel_dump_traceback_later()
        log.info("stopped")

    def start(self) -> None:
        """Recover, connect (in the background), serve the active model and start the workers."""
        plan = self.machine.plan_recovery()  # before any model is loaded: counts crash loops
        self.client.subscribe(topics.command(self.config.device_id), self._on_command, qos=1)
        self.client.subscribe(topics.chunks(self.config.device_id), self._chunks, qos=CHUNK_QOS)
        # After a dropped connection the broker has published our last will (offline);
        # announce again on every reconnect, not only the first connect.
        self.client.on_connected(lambda: self._publish_status(online=True))
        if plan.state == "rolling_back":
            # Finish the rollback before serving: the current bundle may be the one that crashed us.
            self.machine.resume()
        else:
            self._restore_active()
        # After the model is back, so the first status announces it; in the background, so the
        # local API serves even while the broker is away.
        threading.Thread(target=self.seat.join, name="join-broker", daemon=True).start()
        for server in self._servers:
            port = server.start()
            if isinstance(server, HttpApi):
                log.info("local API also on http://127.0.0.1:%d", port)
        self._update_thread = threading.Thread(target=self._update_loop, name="update", daemon=True)
        threads = [self._update_thread,
                   threading.Thread(target=self.telemetry.run, name="telemetry", daemon=True)]
        if self.config.inference_interval > 0:
            threads.append(SampleWorkload(self.slot, self.config.inference_interval, self._stop))
        for t in threads:
            t.start()

    def on_signal(self, *_: Any) -> None:
        """A signal handler for stopping: it only sets a flag, which run() reads within half a
        second. Python runs handlers in the main thread between any two bytecodes, so one that took
        a lock (stop(): Event.set, Queue.put) could wait forever on a lock the code it interrupted
        holds — a second SIGTERM arriving while the first's handler was in Queue.put hung an agent."""
        self._signalled = True

    def stop(self) -> None:
        self._stop.set()
        self._work.put(None)

    def shutdown(self) -> None:
        """After stop(): close the local API, say offline, disconnect."""
        for server in self._servers:
            server.stop()
        if self.client.connected:
            try:
                self.presence.release()
                self._publish_status(online=False)
            except MqttError as exc:  # the broker may be gone; its last will says offline for us
                log.warning("could not announce going offline: %s", exc)
        self.seat.leave()
        self._state_lock.release()

    def _restore_active(self) -> None:
        """Serve the current bundle; if it no longer loads, the newest committed one that does."""
        active = self.store.active()
        candidates = ([active] if active else []) + [
            b for b in (self.store.by_name(n) for n in reversed(self.store.committed()))
            if b is not None and (active is None or b.directory != active.directory)]
        for bundle in candidates:
            try:
                runtime, sample = self._check(bundle, self.config.runtime)
            except EdgefleetError as exc:
                log.error("cannot serve %s: %s", bundle.label, exc)
                continue
            if bundle is not active:
                log.warning("fell back to %s", bundle.label)
                self.store.activate(bundle)
            self.slot.swap(bundle, runtime, sample)
            log.info("serving %s", bundle.label)
            return

    # -- messages ---------------------------------------------------------------------
    def _publish_status(self, *, online: bool) -> None:
        bundle = self.slot.bundle
        status = DeviceStatus(self.config.device_id, online=online, timestamp=time.time(),
                              agent_version=__version__, labels=dict(self.config.labels) or None,
                              hardware=self._hardware if online else None,
                              active_bundle=bundle.label if bundle else None,
                              active_sha256=bundle.sha256 if bundle else None,
                              id_shared_with=[{k: r[k] for k in RIVAL_FIELDS} for r in self.presence.rivals] or None,
                              certificate=self.certificate.describe() if online else None,
                              last_update=self.machine.last_outcome)
        payload = status.to_payload()
        self._status_guard.said(payload)
        self.client.publish(topics.status(self.config.device_id), payload, qos=1, retain=True,
                            wait=5.0 if not online else None)

    def _on_command(self, topic: str, payload: bytes) -> None:
        try:
            command = parse_command(payload, self.keys)
        except (ProtocolError, SignatureError) as exc:
            self._refuse(*command_id_of(payload), exc)
            return
        if isinstance(command, StatusRequest):
            self._reply(Reply(self.config.device_id, command.command_id, "status", True, self.report()))
            return
        try:
            again = command.command_id == self.machine.busy_with or not self._commands.first_time(
                command.command_id, command.issued_at)
        except (ProtocolError, StorageError) as exc:  # replayed, or the disk is full: it does not run
            self._refuse(*command_id_of(payload), exc)
            return
        if again:  # at-least-once delivery, or a host that lost our reply on the way sent it again
            if (kept := self._replies.get(command.command_id)) is not None:
                log.info("command %s was delivered again; it is done: sending its reply again", command.command_id)
                self.client.publish(topics.reply(self.config.device_id), kept, qos=1)
            else:
                log.info("command %s was delivered again; it is done or under way", command.command_id)
            return
        self._work.put((command, None))

    def _refuse(self, kind: str | None, command_id: str | None, exc: EdgefleetError) -> None:
        """Tell the host why a command was not carried out; nothing on the device changes."""
        log.warning("refused command %s (%s): %s", command_id or "-", kind or "?", exc)
        if command_id is None:
            return
        reason = f"command refused: {exc}"
        if kind in ANSWERED:
            self._reply(Reply(self.config.device_id, command_id, "status" if kind == "status_request" else kind,
                              False, {}, reason))
        else:
            self._emit(DeploymentEvent(self.config.device_id, command_id, "failed", "", 0.0, reason, time.time()))

    def _emit(self, event: DeploymentEvent) -> None:
        self.client.publish(topics.events(self.config.device_id), event.to_payload(), qos=1)

    def _reply(self, reply: Reply) -> None:
        payload = reply.to_payload()
        if reply.kind != "status":  # (a status request is answered anew each time)
            self._replies.keep(reply.command_id, payload)
        self.client.publish(topics.reply(self.config.device_id), payload, qos=1)

    def report(self) -> dict[str, Any]:
        """What `status` shows: the active bundle, the versions kept, and any update under way."""
        bundle = self.slot.bundle
        record = self.machine.record
        kept = [b.label for b in (self.store.by_name(n) for n in self.store.committed()) if b is not None]
        return {"device_id": self.config.device_id, "agent_version": __version__,
                "active_bundle": bundle.label if bundle else None, "sha256": bundle.sha256 if bundle else None,
                "committed": kept, "update_state": record.state,
                "update": None if record.state == "idle" else {"command_id": record.command_id,
                                                               "bundle": record.label, "kind": record.kind,
                                                               "attempts": record.attempts},
                "last_update": asdict(outcome) if (outcome := self.machine.last_outcome) else None,
                "connected": self.client.connected, "broker_problem": self.client.problem,
                "pid": os.getpid(), "keys": self.keys.describe(), "certificate": self.certificate.describe(),
                "disk": room(self.store.root),
                "id_held_by": self.seat.held_by, "id_rivals": list(self.presence.rivals),
                **self.settings.describe(self.config)}

    def _local_rollback(self) -> dict[str, Any]:
        done: Future = Future()
        self._work.put((RollbackCommand(f"local-{time.time_ns()}", time.time()), done))
        event = done.result(timeout=300)
        return {"state": event.state, "bundle": event.bundle, "reason": event.reason} if event else {}

    # -- workers ----------------------------------------------------------------------
    def _update_loop(self) -> None:
        self._after_update(self.machine.resume())
        while not self._stop.is_set():
            item = self._work.get()
            if item is None:  # stop()
                return
            command, done = item
            result = None
            try:
                if isinstance(command, DeployCommand):
                    result = self.machine.deploy(command)
                    self._after_update(result)
                elif isinstance(command, RollbackCommand):
                    result = self.machine.rollback(command.command_id)
                    self._after_update(result)
                elif isinstance(command, BenchCommand):
                    self._bench(command)
                elif isinstance(command, TrustCommand):
                    self._change_trust(command)
                elif isinstance(command, ConfigCommand):
                    self._change_settings(command)
                elif isinstance(command, CertificateCommand):
                    self._renew_certificate(command)
            except Exception as exc:  # the update thread must survive anything one command does
                log.exception("command %s failed", command.command_id)
                if done is not None:
                    done.set_exception(exc)
                continue
            if done is not None:
                done.set_result(result)

    def _after_update(self, event: DeploymentEvent | None) -> None:
        if event is not None:
            self._announce("the new active bundle")

    def _announce(self, what: str) -> None:
        try:  # QoS 1: sent now, or queued by the client until the connection is back
            self._publish_status(online=True)
        except MqttError as exc:
            log.warning("could not announce %s: %s", what, exc)

    def _bench(self, command: BenchCommand) -> None:
        try:
            if command.bundle is None:
                bundle = self.slot.bundle
                if bundle is None:
                    raise EdgefleetError("no bundle is active to benchmark")
            else:
                bundle = self.store.installed(command.bundle.sha256)
                if bundle is None:  # fetch and verify it, but do not activate it
                    offer = command.bundle
                    self.store.make_room(offer.sha256, offer.size, offer.unpacked_size or 0, self.config.keep_versions)
                    path = self.store.download_path(offer.sha256)
                    Download(self.client, self._chunks, self.config.device_id, offer, path,
                             window=self.config.chunk_window,
                             stall_timeout=self.config.download_stall_timeout).run()
                    try:
                        bundle = self.store.install(path, self.keys)
                    finally:
                        path.unlink(missing_ok=True)
            result = benchmark(bundle, self.config.runtime, runs=command.runs, warmup=command.warmup)
            self._reply(Reply(self.config.device_id, command.command_id, "bench", True, result))
        except EdgefleetError as exc:
            self._reply(Reply(self.config.device_id, command.command_id, "bench", False, {}, str(exc)))

    def _change_trust(self, command: TrustCommand) -> None:
        try:
            body = self.keys.change(list(command.add), list(command.revoke))
        except EdgefleetError as exc:
            self._refuse("trust", command.command_id, exc)
            return
        self._reply(Reply(self.config.device_id, command.command_id, "trust", True, body))

    def _change_settings(self, command: ConfigCommand) -> None:
        try:
            config = self.settings.apply(self.config, command.settings)
        except EdgefleetError as exc:
            self._refuse("config", command.command_id, exc)
            return
        self.config = self.machine.ctx.config = config  # the loops read it afresh each round
        if command.settings:
            log.info("settings changed by the host: %s", command.settings)
        self._reply(Reply(self.config.device_id, command.command_id, "config", True,
                          self.settings.describe(self.config)))

    def _renew_certificate(self, command: CertificateCommand) -> None:
        """Reconnect showing the renewed certificate; keep it once the broker accepts it, else go back
        to the one before (renewal does not revoke it, so it still works). A renewed CA certificate
        it carries, or a new one linked from a CA trusted here, is trusted from now on; the CAs it
        names as retired are not."""
        try:
            if command.ca is not None and self.certificate.take_ca(command.ca, command.ca_link) is not None:
                self.client.trust(command.ca)
                self._use_tls(self.certificate.tls)
                self._announce("the CA taken up")
            if self.certificate.retire_cas(command.ca_retired, self.client.peer_certificate()):
                self.client.trust_only(self.certificate.tls)
                self._use_tls(self.certificate.tls)
                self._announce("the CA retired")
        except EdgefleetError as exc:
            self._refuse("certificate", command.command_id, exc)
            return
        if self.certificate.shows(command.certificate):  # sent again (its answer was lost): nothing to do
            self._reply(Reply(self.config.device_id, command.command_id, "certificate", True,
                              self.certificate.describe()))
            return
        earlier = self.config.tls
        try:
            self._present(self.certificate.stage(command.certificate))
        except EdgefleetError as exc:
            self.certificate.discard()
            self._refuse("certificate", command.command_id, exc)
            return
        connections = self.client.connections
        self.client.reconnect()
        deadline = time.monotonic() + 10 + 2 * self.config.reconnect_max_delay
        while not (self.client.connected and self.client.connections > connections):
            if self._stop.wait(0.1):
                return  # stopping: the staged certificate is dropped at the next start
            problem = self.client.problem
            if time.monotonic() >= deadline or (problem and problem["attempts"] >= CERTIFICATE_ATTEMPTS):
                self.certificate.discard()
                self._present(earlier)
                self.client.reconnect()
                self._refuse("certificate", command.command_id, EdgefleetError(
                    "the broker did not accept a connection with the renewed certificate; the earlier one is in "
                    "use again"))
                return
        self._present(self.certificate.commit())
        log.info("the broker accepted the renewed client certificate; it is kept")
        self._announce("the renewed certificate")  # (the status sent on connecting showed the one before)
        self._reply(Reply(self.config.device_id, command.command_id, "certificate", True, self.certificate.describe()))

    def _present(self, tls: TlsFiles) -> None:
        self.client.present(tls)
        self._use_tls(tls)

    def _use_tls(self, tls: TlsFiles) -> None:
        """The TLS files the agent's config names from now on (its other connections use them)."""
        self.config = self.machine.ctx.config = replace(self.config, tls=tls)
