"""The update record: what the update machine is doing, saved durably before every side effect.

``update.json`` in the state directory holds one record, and ``last_update.json`` the final
event of the last update (see UpdateMachine.last_outcome). It is replaced
atomically (write, fsync, rename, fsync the directory), so after a power cut or
SIGKILL the agent finds either the previous record or the new one, never half
of one. A record that cannot be read is reported as corrupt, and recovery
treats it like an unknown state: keep or restore the last committed bundle.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from device_agent.errors import ProtocolError, StorageError
from device_agent.protocol.reports import DEPLOY_FINAL, DeploymentEvent
from device_agent.store import write_atomically


@dataclass(frozen=True)
class UpdateRecord:
    state: str
    kind: str = "deploy"            # "deploy" or "rollback"
    command_id: str = ""
    label: str = ""                 # "name version" the command announced
    offer: dict[str, Any] | None = None  # the BundleOffer of a deploy, as sent
    target: str | None = None       # bundle directory being installed or rolled back to
    previous: str | None = None     # the directory that was active when the update began
    attempts: int = 0               # times the current state was entered (bounds crash loops)
    allow_downgrade: bool = False   # the signed command allows a lower release than committed
    reason: str | None = None       # why the update is failing, once it is

    def entering(self, state: str) -> "UpdateRecord":
        """This record in *state*; re-entering the same state (after a crash) counts an attempt."""
        return replace(self, state=state, attempts=self.attempts + 1 if state == self.state else 1)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()


IDLE = UpdateRecord(state="idle")


class CorruptRecord(Exception):
    """update.json exists but does not hold a record this agent can read."""


class UpdateJournal:
    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / "update.json"
        self.outcome_path = Path(state_dir) / "last_update.json"  # the last update's final event

    def load(self) -> UpdateRecord:
        """The saved record; IDLE when there is none. Raises CorruptRecord when it is unreadable."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return IDLE
        except OSError as exc:
            raise CorruptRecord(f"cannot read {self.path.name}: {exc}") from None
        try:
            doc = json.loads(data)
            known = {f.name for f in fields(UpdateRecord)}
            if not isinstance(doc, dict) or not isinstance(doc.get("state"), str) or set(doc) - known:
                raise ValueError("not an update record")
            record = UpdateRecord(**doc)
            if not isinstance(record.attempts, int) or not isinstance(record.kind, str):
                raise ValueError("mistyped fields")
            return record
        except (ValueError, TypeError, UnicodeDecodeError) as exc:
            raise CorruptRecord(f"{self.path.name} is corrupt: {exc}") from None

    def save(self, record: UpdateRecord) -> None:
        _write(self.path, record.to_json(), "state")

    def load_outcome(self) -> DeploymentEvent | None:
        """The final event of the last update, as saved; None when there is none (or it is unreadable:
        it only tells the host, and is written again by the next update)."""
        try:
            event = DeploymentEvent.from_payload(self.outcome_path.read_bytes())
        except (OSError, ProtocolError):
            return None
        return event if event.state in DEPLOY_FINAL else None

    def save_outcome(self, event: DeploymentEvent) -> None:
        _write(self.outcome_path, event.to_payload(), "outcome")

    def saved_state(self) -> str:
        """The state on disk, for a log line: what a restart would find."""
        try:
            return self.load().state
        except CorruptRecord:
            return "a corrupt record"


def _write(path: Path, data: bytes, what: str) -> None:
    try:
        write_atomically(path, data)
    except OSError as exc:
        raise StorageError(f"cannot record the update's {what} on the device's disk: {exc.strerror or exc}") from None
