"""Runs the update state machine: saves each state before entering it, recovers after a crash."""

from __future__ import annotations

import logging
from dataclasses import asdict, replace

from device_agent.errors import StorageError
from device_agent.protocol.commands import DeployCommand
from device_agent.protocol.reports import DEPLOY_FINAL, DeploymentEvent
from device_agent.update import faults
from device_agent.update.record import IDLE, CorruptRecord, UpdateJournal, UpdateRecord
from device_agent.update.states import (
    FAIL, RECOVERY, STATES, TRANSITIONS, UNKNOWN_STATE_RECOVERY, UpdateContext,
)

log = logging.getLogger(__name__)


class UpdateMachine:
    def __init__(self, ctx: UpdateContext) -> None:
        self.ctx = ctx
        self.journal = UpdateJournal(ctx.config.state_dir)
        self.record = IDLE
        # The final event of the last update, kept on disk: the agent's retained status carries it,
        # so a host that missed the event itself (it was sent while the host or the broker was
        # away, or the agent stopped before it went out) still learns what became of its command.
        self.last_outcome = self.journal.load_outcome()

    # -- start-up ---------------------------------------------------------------------
    def plan_recovery(self) -> UpdateRecord:
        """Decide what to do about the record a previous run left, and save that decision.

        Runs before any model is loaded, so a model that crashes the agent on load is
        counted too: each start in the same state is an attempt, and past the limit the
        machine takes the state's ``fail`` edge (clean up, or roll back).
        """
        try:
            saved = self.journal.load()
        except CorruptRecord as exc:
            log.error("%s: keeping or restoring the last committed bundle", exc)
            saved = UpdateRecord(state="unknown", kind="recover", reason=str(exc))
        if saved.state == "idle":
            self.record = IDLE
            return IDLE
        state = RECOVERY.get(saved.state)
        if state is None:
            record = replace(saved, kind="recover", reason=saved.reason or f"unknown saved state {saved.state!r}")
            record = record.entering(UNKNOWN_STATE_RECOVERY)
        else:
            record = saved.entering(state)
            if record.attempts > self.ctx.config.max_start_attempts:
                fail = TRANSITIONS[(saved.state, "fail")] if (saved.state, "fail") in TRANSITIONS else "idle"
                reason = (f"the agent stopped {saved.attempts} times in state {saved.state} "
                          f"(crash loop){'; ' + saved.reason if saved.reason else ''}")
                record = replace(saved, reason=reason).entering(fail)
        log.warning("found update %s (%s) in state %s after a restart; going on with %s",
                    record.command_id or "-", record.label or "-", saved.state, record.state)
        self._save_or_go_on(record)
        return record

    def resume(self) -> DeploymentEvent | None:
        """Carry on with what plan_recovery decided (a download waits for the broker like any other)."""
        if self.record.state == "idle":
            return None
        return self._run(self.record, new=False)

    # -- commands ---------------------------------------------------------------------
    @property
    def busy_with(self) -> str | None:
        return self.record.command_id if self.record.state != "idle" else None

    def deploy(self, command: DeployCommand) -> DeploymentEvent:
        offer = command.bundle
        record = UpdateRecord(state="idle", kind="deploy", command_id=command.command_id,
                              label=f"{offer.name} {offer.version}", offer=asdict(offer),
                              allow_downgrade=command.allow_downgrade)
        active = self.ctx.slot.bundle
        if active is not None and active.sha256 == offer.sha256:
            return self._finished(self.ctx.event(record, "already_installed", 1.0))
        record = replace(record, previous=active.directory.name if active is not None else None)
        self.ctx.event(record, "accepted")
        return self._run(record.entering(TRANSITIONS[("idle", "deploy")]))

    def rollback(self, command_id: str) -> DeploymentEvent:
        active = self.ctx.slot.bundle
        target = self.ctx.store.rollback_target()
        record = UpdateRecord(state="idle", kind="rollback", command_id=command_id,
                              label=target.label if target is not None else "",
                              previous=active.directory.name if active is not None else None,
                              target=target.directory.name if target is not None else None)
        return self._run(record.entering(TRANSITIONS[("idle", "rollback")]))

    # -- the loop ---------------------------------------------------------------------
    def _run(self, record: UpdateRecord, *, new: bool = True) -> DeploymentEvent:
        """Run *record* to idle. A *new* update whose first state cannot be saved (a full disk)
        does not start: it is reported failed with nothing changed."""
        self.ctx.last_event = None
        if new:
            try:
                self._save(record)
            except StorageError as exc:
                return self._finished(self.ctx.event(record, "failed", reason=f"not started: {exc}"))
        saved = new
        while record.state != "idle":
            if not saved:
                self._save_or_go_on(record)  # durable before the state's side effect
            saved = False
            faults.entered(record.state, self.ctx.config.state_dir)
            log.info("update %s: %s", record.command_id, record.state)
            try:
                event, record = STATES[record.state].enter(self.ctx, record)
            except Exception as exc:  # a bug or an unforeseen OS error must not leave the update stuck here
                log.exception("update %s: %s failed unexpectedly", record.command_id, record.state)
                record = replace(record, reason=f"{record.state} failed unexpectedly: {exc}")
                if (record.state, FAIL) not in TRANSITIONS:  # rolling back or cleaning up: report, stop
                    self.ctx.event(record, "failed", reason=record.reason)
                    break
                event = FAIL
            following = TRANSITIONS[(record.state, event)]
            record = IDLE if following == "idle" else record.entering(following)
        self._finished(self.ctx.last_event)  # before idle is saved: a crash in between ends the update again
        self._save_or_go_on(IDLE)
        return self.ctx.last_event

    def _finished(self, event: DeploymentEvent | None) -> DeploymentEvent | None:
        """Keep *event* as the last outcome if it is a command's final event, and log it: the
        device's own log says how every update ended, and why one failed."""
        if event is not None and event.command_id and event.state in DEPLOY_FINAL:
            log.log(logging.WARNING if event.state == "failed" else logging.INFO, "update %s (%s): %s%s",
                    event.command_id, event.bundle or "no bundle", event.state,
                    f": {event.reason}" if event.reason else "")
            self.last_outcome = event
            try:
                self.journal.save_outcome(event)
            except StorageError as exc:
                log.warning("%s; a restart would forget it", exc)
        return event

    def _save(self, record: UpdateRecord) -> None:
        self.journal.save(record)
        self.record = record

    def _save_or_go_on(self, record: UpdateRecord) -> None:
        """Save *record*; if the disk is full, go on with it unsaved. Every state can be entered
        again, so a crash then resumes from the last state saved and does the rest again; but its
        attempts are not counted until the record can be written."""
        try:
            self._save(record)
        except StorageError as exc:
            log.warning("%s; going on (a restart now would resume from %s)", exc, self.journal.saved_state())
            self.record = record
