"""One deployment on a device: download, verify, health-check, activate.

The previously active bundle keeps serving until the new one is verified and
has passed its sample check; only then is ``current`` swapped. Any failure
leaves the device on what it ran before and is reported with its reason.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from device_agent.errors import EdgefleetError
from device_agent.mqtt import MqttClient
from device_agent.protocol.messages import DeployCommand, DeploymentEvent
from device_agent.runtime import load_runtime
from device_agent.sample import check_sample
from device_agent.serving import ModelSlot
from device_agent.store import BundleStore
from device_agent.transfer import ChunkRouter, Download

log = logging.getLogger(__name__)


@dataclass
class UpdateContext:
    device_id: str
    client: MqttClient
    chunks: ChunkRouter
    store: BundleStore
    slot: ModelSlot
    keys: Mapping[str, Ed25519PublicKey]
    emit: Callable[[DeploymentEvent], None]
    chunk_window: int = 8
    stall_timeout: float = 30.0
    runtime_threads: int | None = None


def deploy(ctx: UpdateContext, command: DeployCommand) -> DeploymentEvent:
    """Carry out *command*; returns the final event (active, already_installed or failed)."""
    offer = command.bundle
    label = f"{offer.name} {offer.version}"

    def event(state: str, progress: float = 0.0, reason: str | None = None) -> DeploymentEvent:
        ev = DeploymentEvent(ctx.device_id, command.command_id, state, label, progress, reason, time.time())
        ctx.emit(ev)
        return ev

    active = ctx.slot.bundle
    if active is not None and active.sha256 == offer.sha256:
        return event("already_installed", 1.0)
    event("accepted")
    try:
        installed = ctx.store.installed(offer.sha256)
        if installed is None:
            path = ctx.store.download_path(offer.sha256)
            last = [0.0]

            def progress(fraction: float) -> None:
                # report every 10% so a large bundle does not flood the broker
                if fraction - last[0] >= 0.1 or fraction >= 1.0:
                    last[0] = fraction
                    event("downloading", fraction)

            event("downloading", 0.0)
            Download(ctx.client, ctx.chunks, ctx.device_id, offer, path, window=ctx.chunk_window,
                     stall_timeout=ctx.stall_timeout, on_progress=progress).run()
            event("verifying", 1.0)
            try:
                installed = ctx.store.install(path, ctx.keys)
            finally:
                path.unlink(missing_ok=True)
        if (installed.manifest.name, installed.manifest.version) != (offer.name, offer.version):
            return event("failed", reason=f"bundle holds {installed.label}, command announced {label}")
        event("activating", 1.0)
        runtime = load_runtime(installed.manifest.runtime, installed.files / installed.manifest.model_file,
                               threads=ctx.runtime_threads)
        sample = check_sample(runtime, installed.manifest, installed.files)
        ctx.store.activate(installed)
        ctx.slot.swap(installed, runtime, sample)
    except EdgefleetError as exc:
        log.warning("deployment of %s failed: %s", label, exc)
        return event("failed", reason=str(exc))
    log.info("activated %s", label)
    return event("active", 1.0)
