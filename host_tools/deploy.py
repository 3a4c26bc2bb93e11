"""Send a bundle (or a rollback) to named devices and follow each one until it is done."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable

from device_agent.bundle import BundleReader
from device_agent.errors import ConfigError, ProtocolError
from device_agent.mqtt import MqttClient
from device_agent.protocol import topics
from device_agent.protocol.commands import DeployCommand, RollbackCommand
from device_agent.protocol.reports import DEPLOY_FINAL, DeploymentEvent
from host_tools.connectivity import NEVER_SEEN, Connectivity
from host_tools.packet_limit import check_broker_passes_chunks
from host_tools.serve import BundleServer
from host_tools.terminal import console

log = logging.getLogger(__name__)

# The outcomes the host gives a device itself when it waits no longer (EventTracker.wait).
GIVEN_UP = ("timed_out", "unreachable")


@dataclass(frozen=True)
class DeviceProgress:
    device_id: str
    state: str = "pending"
    progress: float = 0.0
    reason: str | None = None

    @property
    def done(self) -> bool:
        return self.state in DEPLOY_FINAL or self.state in GIVEN_UP

    @property
    def succeeded(self) -> bool:
        return self.state in ("active", "already_installed", "rolled_back", "skipped")


def incompatible(devices: Iterable[str], target: dict | None, registry: dict[str, dict | None]) -> dict[str, str]:
    """{device: why} for the devices the registry says cannot run a bundle made for *target*; a
    device the registry does not know is left to check for itself (it refuses before downloading)."""
    from device_agent.errors import PolicyError
    from device_agent.update.policy import check_target

    out = {}
    for device in devices:
        hardware = registry.get(device)
        if not target or not hardware:
            continue
        try:
            check_target(target, hardware)
        except (PolicyError, KeyError) as exc:
            out[device] = f"skipped: {exc}" if isinstance(exc, PolicyError) else "skipped: registry entry incomplete"
    return out


class EventTracker:
    """Follows one command's deployment events from each device until every device has a final state."""

    def __init__(self, client: MqttClient, devices: Iterable[str], signer: Callable[[bytes], bytes],
                 on_update: Callable[[DeviceProgress], None] | None = None, *,
                 watch_connectivity: bool = False) -> None:
        """The devices' retained statuses are followed too: one that carries this command's outcome
        (its last update) ends the wait for that device though its event never arrived. With
        *watch_connectivity*, a device that has not answered yet and is offline, or has never
        connected to this broker, is said to be (in its progress's reason) while the command waits."""
        self._client = client
        self._signer = signer
        self.devices = list(dict.fromkeys(devices))
        bad = [d for d in self.devices if not topics.valid_device_id(d)]
        if not self.devices or bad:
            raise ConfigError(f"invalid device id(s): {', '.join(bad) or '(none given)'}")
        self.on_update = on_update
        self._lock = threading.Condition()
        self.command_id = uuid.uuid4().hex
        self.progress = {d: DeviceProgress(d) for d in self.devices}
        self._notes = watch_connectivity
        self.connectivity = Connectivity(client, self.devices, self._on_status)

    def send(self, payload: bytes) -> None:
        """Subscribe to the devices' events, then send them *payload* (a command with our id), signed."""
        payload = self._signer(payload)
        for device in self.devices:
            self._client.subscribe(topics.events(device), self._on_event, qos=1)
        self.connectivity.watch()
        for device in self.devices:
            self._client.publish(topics.command(device), payload, qos=1)

    def wait(self, timeout: float) -> dict[str, DeviceProgress]:
        """Block until every device is done, or has never connected to the broker (watching
        connectivity: the broker kept no command for it), or *timeout* passes. In what this returns,
        the former are unreachable and devices without an outcome by the timeout timed_out (their
        events still count if they come later)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not all(p.done or self._unreachable(d) for d, p in self.progress.items()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._lock.wait(min(remaining, 0.5))
            return {d: p if p.done else
                    replace(p, state="unreachable", reason=NEVER_SEEN) if self._unreachable(d) else
                    replace(p, state="timed_out", reason=self._timed_out(d, timeout))
                    for d, p in self.progress.items()}

    def _unreachable(self, device: str) -> bool:
        """No word from *device* and no status of it at the broker (one that does answer, on a broker
        that keeps no status, is followed to the end)."""
        return (self.progress[device].state == "pending" and self._notes
                and self.connectivity.note(device) == NEVER_SEEN)

    def close(self) -> None:
        self.connectivity.close()

    def _timed_out(self, device: str, timeout: float) -> str:
        last = self.progress[device].state
        if last != "pending":  # it did answer: where it got to
            return f"no outcome within {timeout:g}s (the last it said: {last})"
        note = self.connectivity.note(device) if self._notes else None
        if note is not None:
            return f"no outcome within {timeout:g}s: {note}"
        return f"no outcome within {timeout:g}s" + ("" if self._notes else " (device offline?)")

    def _on_status(self, device: str) -> None:
        status = self.connectivity.last_status(device)
        if status is not None and status.last_update is not None and status.last_update.command_id == self.command_id:
            # (A reconnecting agent's status goes out before the events it queued while away, and
            # is all there is of an event lost with the broker or while this host was away.)
            self._progressed(status.last_update, " (as its status says)")
            return
        if not self._notes:
            return
        with self._lock:
            if self.progress[device].state != "pending":
                return
            update = replace(self.progress[device], reason=self.connectivity.note(device, short=True))
            self.progress[device] = update
            self._lock.notify_all()  # a device that never connected ends the wait for it
        if self.on_update is not None:
            self.on_update(update)

    def _on_event(self, topic: str, payload: bytes) -> None:
        try:
            event = DeploymentEvent.from_payload(payload)
        except ProtocolError:
            return
        if event.command_id != self.command_id or event.device_id not in self.progress:
            return
        self._progressed(event)

    def _progressed(self, event: DeploymentEvent, how: str = "") -> None:
        with self._lock:
            if self.progress[event.device_id].done:
                return
            if event.state != self.progress[event.device_id].state:  # (not every percent of a download)
                log.info("%s: %s%s%s", event.device_id, event.state, f" ({event.reason})" if event.reason else "",
                         how)
            update = DeviceProgress(event.device_id, event.state, event.progress, event.reason)
            self.progress[event.device_id] = update
            self._lock.notify_all()
        if self.on_update is not None:
            self.on_update(update)


class Deployment(EventTracker):
    def __init__(self, client: MqttClient, server: BundleServer, bundle: Path, devices: Iterable[str],
                 signer: Callable[[bytes], bytes], on_update: Callable[[DeviceProgress], None] | None = None,
                 allow_downgrade: bool = False, watch_connectivity: bool = False) -> None:
        self.bundle = Path(bundle)
        self.allow_downgrade = allow_downgrade
        with BundleReader(self.bundle) as reader:  # refuse what is not a bundle before telling anyone
            self.manifest = reader.manifest
        super().__init__(client, devices, signer, on_update, watch_connectivity=watch_connectivity)
        self._server = server

    def start(self) -> None:
        offer = self._server.offer_bundle(self.bundle, self.manifest)
        self.send(DeployCommand(self.command_id, offer, time.time(), self.allow_downgrade).to_payload())


def run_rollback(client: MqttClient, devices: Iterable[str], *, signer: Callable[[bytes], bytes],
                 timeout: float, on_update: Callable[[DeviceProgress], None] | None = None,
                 ) -> dict[str, DeviceProgress]:
    """Ask *devices* to go back to their previous committed version and wait for each outcome
    (*on_update* with each device's progress while it waits)."""
    tracker = EventTracker(client, devices, signer, on_update, watch_connectivity=True)
    try:
        tracker.send(RollbackCommand(tracker.command_id, time.time()).to_payload())
        return tracker.wait(timeout)
    finally:
        tracker.close()


def run_deployment(client: MqttClient, bundle: Path, devices: Iterable[str], *, signer: Callable[[bytes], bytes],
                   timeout: float, chunk_size: int, show_progress: bool = True,
                   allow_downgrade: bool = False, serve: bool = True) -> dict[str, DeviceProgress]:
    """Serve *bundle* (unless *serve* is False: a running `edgefleet serve` does), deploy it to
    *devices* and show one progress bar per device until all are done."""
    check_broker_passes_chunks(client, chunk_size)
    server = BundleServer(client, chunk_size=chunk_size)
    if serve:
        server.start()
    try:
        deployment = Deployment(client, server, bundle, devices, signer, allow_downgrade=allow_downgrade,
                                watch_connectivity=True)
        try:
            if not show_progress:
                deployment.start()
                return deployment.wait(timeout)
            return _with_progress(deployment, timeout)
        finally:
            deployment.close()
    finally:
        if serve:
            server.stop()


def _with_progress(deployment: Deployment, timeout: float) -> dict[str, DeviceProgress]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Column

    err = console(stderr=True)
    # A long state (a failure's reason) is cut short here, not the device or the bar; the caller
    # prints every outcome that is not a success in full.
    name_width = min(24, max(14, *(len(d) for d in deployment.devices)))
    bar_width = 24 if err.width >= 100 else 16
    state_width = max(16, err.width - name_width - bar_width - 4 - 7 - 4)  # less percentage, time and spaces
    progress = Progress(TextColumn("{task.fields[device]}", table_column=Column(min_width=name_width, no_wrap=True)),
                        BarColumn(bar_width=bar_width), TextColumn("{task.percentage:>3.0f}%"),
                        TextColumn("{task.fields[state]}", table_column=Column(max_width=state_width, no_wrap=True,
                                                                              overflow="ellipsis")),
                        TimeElapsedColumn(), console=err)
    tasks: dict[str, int] = {}

    def on_update(p: DeviceProgress) -> None:
        state = p.state if p.reason is None else f"{p.state}: {p.reason}"
        progress.update(tasks[p.device_id], completed=p.progress * 100, state=state)

    deployment.on_update = on_update
    err.print(f"deploying {deployment.manifest.label} ({deployment.bundle.stat().st_size} bytes) "
                  f"to {len(deployment.devices)} device(s)")
    with progress:
        for d in deployment.devices:
            tasks[d] = progress.add_task(d, total=100, device=d, state="pending")
        deployment.start()
        results = deployment.wait(timeout)
        for p in results.values():
            if p.state in GIVEN_UP:
                on_update(p)
    return results
