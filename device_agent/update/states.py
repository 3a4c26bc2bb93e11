"""The update state machine: small states, one transition table, one recovery table.

Each state does one thing in ``enter`` and answers with an event, ``done`` or
``fail``; ``TRANSITIONS`` says where that leads. The machine (``machine.py``)
saves the record in its new state *before* calling ``enter``, so a crash in
any state leaves a record that names it, and ``RECOVERY`` says what start-up
does about it. A state re-entered after a crash counts an attempt; past the
limit the machine takes that state's ``fail`` edge instead (a crash loop ends
in clean-up or rollback, never in a device that restarts forever).

    idle ─deploy─▶ downloading ─▶ verifying ─▶ health_check ─▶ activating ─▶ trial ─▶ committing ─▶ idle
                        │              │             │               │           │          │
                        └──────────────┴──── fail ───┴─▶ cleanup     └──── fail ─┴──────────┴─▶ rolling_back
    idle ─rollback─▶ rolling_back ─▶ idle                cleanup ─▶ idle

Everything before ``activating`` leaves the old bundle current and serving, so
its failures only clean up; from ``activating`` on the new bundle may be live,
so failures roll back.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from device_agent.config import AgentConfig
from device_agent.errors import EdgefleetError, PolicyError, StorageError, TransferTimeout
from device_agent.mqtt import MqttClient
from device_agent.protocol.chunks import BundleOffer
from device_agent.protocol.reports import DeploymentEvent
from device_agent.runtime import ModelRuntime, RuntimeOptions
from device_agent.serving import ModelSlot
from device_agent.store import BundleStore, InstalledBundle
from device_agent.transfer import ChunkRouter, Download
from device_agent.update.health import health_check
from device_agent.update.policy import check_expiry, check_release, check_target, device_facts
from device_agent.update.record import UpdateRecord

log = logging.getLogger(__name__)

DONE, FAIL = "done", "fail"

TRANSITIONS: dict[tuple[str, str], str] = {
    # from             event        to
    ("idle",           "deploy"):   "downloading",
    ("idle",           "rollback"): "rolling_back",
    ("downloading",    DONE):       "verifying",
    ("downloading",    FAIL):       "cleanup",
    ("verifying",      DONE):       "health_check",
    ("verifying",      FAIL):       "cleanup",
    ("health_check",   DONE):       "activating",
    ("health_check",   FAIL):       "cleanup",
    ("activating",     DONE):       "trial",
    ("activating",     FAIL):       "rolling_back",
    ("trial",          DONE):       "committing",
    ("trial",          FAIL):       "rolling_back",
    ("committing",     DONE):       "idle",
    ("committing",     FAIL):       "rolling_back",
    ("rolling_back",   DONE):       "idle",
    ("cleanup",        DONE):       "idle",
}

# What start-up does with the state it finds saved. Anything not listed (an unknown
# or corrupt record) means: keep or restore the last committed bundle.
RECOVERY: dict[str, str] = {
    "idle":          "idle",
    "downloading":   "downloading",   # fetch again; the old bundle is still current
    "verifying":     "verifying",     # verify again (fetch again if the download is gone)
    "health_check":  "health_check",  # check again; the old bundle is still current
    "activating":    "activating",    # the swap is idempotent: do it again
    "trial":         "trial",         # the new bundle is live: try again, counting the crash
    "committing":    "committing",    # committing is idempotent
    "rolling_back":  "rolling_back",  # rolling back is idempotent
    "cleanup":       "cleanup",       # cleaning up is idempotent
}
UNKNOWN_STATE_RECOVERY = "rolling_back"


@dataclass
class UpdateContext:
    """What states act on. ``emit`` publishes a deployment event to the host."""

    config: AgentConfig
    client: MqttClient
    chunks: ChunkRouter
    store: BundleStore
    slot: ModelSlot
    keys: Mapping[str, Ed25519PublicKey]
    emit: Callable[[DeploymentEvent], None]
    # Loads and checks a bundle's model (the simulator shares one loaded runtime among its devices).
    check: Callable[[InstalledBundle, RuntimeOptions], tuple[ModelRuntime, dict[str, np.ndarray]]] = health_check
    # Runtimes that passed their health check in this process, by bundle directory name,
    # so activating does not load the model a second time.
    checked: dict[str, tuple[ModelRuntime, dict[str, np.ndarray]]] = field(default_factory=dict)
    last_event: DeploymentEvent | None = None

    def event(self, record: UpdateRecord, state: str, progress: float = 0.0,
              reason: str | None = None) -> DeploymentEvent:
        ev = DeploymentEvent(self.config.device_id, record.command_id, state, record.label, progress,
                             reason, time.time())
        self.last_event = ev
        try:
            self.emit(ev)
        except EdgefleetError as exc:  # offline: the retained status still tells the truth later
            log.warning("could not report %s: %s", state, exc)
        return ev


class State:
    name: str

    def enter(self, ctx: UpdateContext, record: UpdateRecord) -> tuple[str, UpdateRecord]:
        raise NotImplementedError


def _fail(record: UpdateRecord, reason: str) -> tuple[str, UpdateRecord]:
    return FAIL, replace(record, reason=reason)


def _target(ctx: UpdateContext, record: UpdateRecord) -> InstalledBundle | None:
    return ctx.store.by_name(record.target)


class Downloading(State):
    name = "downloading"

    def enter(self, ctx, record):
        offer = BundleOffer.from_dict(record.offer)
        try:
            check_target(offer.target, device_facts())  # before a byte is fetched
        except PolicyError as exc:
            return _fail(record, f"refused before download: {exc}")
        if ctx.store.installed(offer.sha256) is not None:
            return DONE, record  # installed before (e.g. an earlier version we rolled back from)
        try:
            ctx.store.make_room(offer.sha256, offer.size, offer.unpacked_size or 0, ctx.config.keep_versions)
        except StorageError as exc:
            return _fail(record, f"refused before download: {exc}")
        path = ctx.store.download_path(offer.sha256)
        last = [-1.0]

        def progress(fraction: float) -> None:
            if fraction - last[0] >= 0.1 or fraction >= 1.0:  # every 10%: do not flood the broker
                last[0] = fraction
                ctx.event(record, "downloading", fraction)

        progress(0.0)
        attempts = ctx.config.download_attempts
        for attempt in range(1, attempts + 1):
            download = Download(ctx.client, ctx.chunks, ctx.config.device_id, offer, path,
                                window=ctx.config.chunk_window, stall_timeout=ctx.config.download_stall_timeout,
                                on_progress=progress)
            try:
                download.run()  # resumes from the chunks an earlier attempt (or run) wrote
                return DONE, record
            except TransferTimeout as exc:
                if attempt == attempts:
                    return _fail(record, f"download failed after {attempts} attempts: {exc}")
                wait = ctx.config.download_backoff * 2 ** (attempt - 1)
                log.warning("download of %s stalled (%s); attempt %d of %d in %g s", record.label, exc,
                            attempt + 1, attempts, wait)
                time.sleep(wait)
            except EdgefleetError as exc:
                return _fail(record, f"download failed: {exc}")
        raise AssertionError("unreachable")


class Verifying(State):
    name = "verifying"

    def enter(self, ctx, record):
        offer = BundleOffer.from_dict(record.offer)
        ctx.event(record, "verifying", 1.0)
        installed = ctx.store.installed(offer.sha256)
        if installed is None:
            path = ctx.store.download_path(offer.sha256)
            if not path.exists():
                return _fail(record, "the downloaded bundle is gone (the agent stopped while verifying); "
                                     "deploy again")
            try:
                # the Downloading state returned only after the file matched offer.sha256
                installed = ctx.store.install(path, ctx.keys, sha256=offer.sha256)
            except EdgefleetError as exc:
                return _fail(record, str(exc))
            finally:
                path.unlink(missing_ok=True)
        record = replace(record, target=installed.directory.name)
        if installed.label != record.label:
            return _fail(record, f"bundle holds {installed.label}, the command announced {record.label}")
        manifest = installed.manifest
        try:
            check_expiry(manifest)
            check_target(manifest.target, device_facts())
            check_release(manifest, ctx.store.highest_release(manifest.name), record.allow_downgrade)
        except PolicyError as exc:
            return _fail(record, f"refused: {exc}")
        return DONE, record


class HealthCheck(State):
    name = "health_check"

    def enter(self, ctx, record):
        ctx.event(record, "health_check", 1.0)
        bundle = _target(ctx, record)
        if bundle is None:
            return _fail(record, f"installed bundle {record.target} is missing")
        try:
            ctx.checked[bundle.directory.name] = ctx.check(bundle, ctx.config.runtime)
        except EdgefleetError as exc:
            return _fail(record, f"health check failed: {exc}")
        return DONE, record


class Activating(State):
    name = "activating"

    def enter(self, ctx, record):
        ctx.event(record, "activating", 1.0)
        bundle = _target(ctx, record)
        if bundle is None:
            return _fail(record, f"installed bundle {record.target} is missing")
        try:
            checked = ctx.checked.pop(bundle.directory.name, None) or ctx.check(bundle, ctx.config.runtime)
        except EdgefleetError as exc:
            return _fail(record, f"health check failed: {exc}")
        ctx.store.activate(bundle)
        ctx.slot.swap(bundle, *checked)
        return DONE, record


class Trial(State):
    """The new bundle is live. It must answer its sample through the serving path and keep
    serving without errors for the trial period; an agent that keeps dying here rolls back."""

    name = "trial"

    def enter(self, ctx, record):
        bundle = _target(ctx, record)
        if ctx.slot.bundle is None or bundle is None or ctx.slot.bundle.directory != bundle.directory:
            # started again after a crash: serve the new bundle again first
            if bundle is None:
                return _fail(record, f"installed bundle {record.target} is missing")
            try:
                ctx.slot.swap(bundle, *ctx.check(bundle, ctx.config.runtime))
            except EdgefleetError as exc:
                return _fail(record, f"the new bundle no longer passes its health check: {exc}")
        errors_before = ctx.slot.errors
        try:
            ctx.slot.infer()
        except EdgefleetError as exc:
            return _fail(record, f"the live model failed: {exc}")
        time.sleep(ctx.config.trial_seconds)
        failed = ctx.slot.errors - errors_before
        if failed:
            return _fail(record, f"{failed} inference(s) failed during the {ctx.config.trial_seconds:g} s trial")
        return DONE, record


class Committing(State):
    name = "committing"

    def enter(self, ctx, record):
        bundle = _target(ctx, record)
        if bundle is None:
            return _fail(record, f"installed bundle {record.target} is missing")
        try:
            removed = ctx.store.commit(bundle, keep=ctx.config.keep_versions)
            _raise_high_water_mark(ctx.store, bundle.manifest)
        except OSError as exc:
            return _fail(record, f"cannot record the commit: {exc}")
        if removed:
            log.info("removed old versions: %s", ", ".join(removed))
        ctx.event(record, "active", 1.0)
        log.info("committed %s", bundle.label)
        return DONE, record


def _raise_high_water_mark(store: BundleStore, manifest) -> None:
    try:
        check_release(manifest, store.highest_release(manifest.name), allow_downgrade=False)
    except PolicyError:
        return  # a deliberate downgrade: the highest release committed stays what it was
    store.record_release(manifest)


class RollingBack(State):
    """Back to the last good bundle: the one active before the update, else the newest
    committed one that still passes its health check, else no model at all."""

    name = "rolling_back"

    def enter(self, ctx, record):
        active = ctx.store.active()
        if record.kind == "rollback":  # asked for by an operator; both ends chosen when it was asked,
            failed_dir = record.previous  # so a crash half-way does not roll back twice
            candidates = [record.target]
            if record.target is None:
                ctx.event(record, "failed", reason="no earlier committed version to roll back to")
                return DONE, record
        elif record.kind == "deploy":
            failed_dir = record.target
            candidates = [record.previous] + list(reversed(ctx.store.committed()))
        else:  # unknown or corrupt record: keep or restore the last committed bundle
            failed_dir = None
            candidates = list(reversed(ctx.store.committed()))
        reasons = []
        for name in dict.fromkeys(c for c in candidates if c and c != failed_dir):
            bundle = ctx.store.by_name(name)
            if bundle is None:
                continue
            try:
                checked = ctx.check(bundle, ctx.config.runtime)
            except EdgefleetError as exc:
                reasons.append(f"{bundle.label}: {exc}")
                continue
            ctx.store.activate(bundle)
            ctx.slot.swap(bundle, *checked)
            self._report(ctx, record, failed_dir, f"rolled back to {bundle.label}")
            return DONE, record
        if record.kind == "rollback":
            ctx.event(record, "failed", reason="no earlier version passes its health check: " + "; ".join(reasons))
            return DONE, record
        if failed_dir is not None and active is not None and active.directory.name == failed_dir:
            ctx.store.deactivate()
            ctx.slot.clear()
        self._report(ctx, record, failed_dir, "no earlier version to roll back to; no model is active"
                     if ctx.store.active() is None else "kept the active bundle")
        return DONE, record

    @staticmethod
    def _report(ctx, record, failed_dir, outcome):
        if failed_dir:
            ctx.store.uncommit(failed_dir)
        if record.kind == "rollback":
            ctx.event(record, "rolled_back", 1.0, reason=outcome)
        elif record.kind == "deploy":
            ctx.event(record, "failed", reason=f"{record.reason or 'update failed'}; {outcome}")
        else:  # a recovery no command asked for: no event, so no line from the machine's log of outcomes
            log.warning("%s (%s)", outcome, record.reason or record.kind)


class Cleanup(State):
    """A deployment failed before its bundle went live: remove its traces, keep the old bundle."""

    name = "cleanup"

    def enter(self, ctx, record):
        if record.offer is not None:
            try:
                ctx.store.discard_download(BundleOffer.from_dict(record.offer).sha256)
            except EdgefleetError:
                pass
        active = ctx.store.active()
        bundle = _target(ctx, record)
        if (bundle is not None and bundle.directory.name not in ctx.store.committed()
                and (active is None or active.directory != bundle.directory)):
            ctx.store.remove(bundle)
        ctx.checked.clear()
        ctx.event(record, "failed", reason=record.reason or "update failed")
        return DONE, record


STATES: dict[str, State] = {s.name: s for s in (Downloading(), Verifying(), HealthCheck(), Activating(), Trial(),
                                                Committing(), RollingBack(), Cleanup())}


def check_tables() -> None:
    """The tables agree with each other and with STATES (a test runs this too)."""
    names = set(STATES) | {"idle"}
    for (src, _event), dst in TRANSITIONS.items():
        assert src in names and dst in names, (src, dst)
    for name in STATES:
        assert (name, DONE) in TRANSITIONS, f"{name} has no done edge"
    assert set(RECOVERY) == names and set(RECOVERY.values()) <= names
