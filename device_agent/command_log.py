"""Command ids the agent has acted on, kept on disk: MQTT delivers at least once, and a
command redelivered after a restart must not run twice — nor one replayed by whoever can
publish to the device's topic, for as long as its signature has not expired.

The log keeps the last REMEMBERED commands and, of those it has let go, the latest issue time
(the *horizon*): a command issued at or before it, and not among those remembered, may have run
already, so it is refused. Without the horizon, a signed rollback captured off the broker could
be played again once 512 newer commands had pushed its id out, up to its expiry (days).
"""

from __future__ import annotations

import json
import threading
from collections import deque
from pathlib import Path

from device_agent.errors import ProtocolError, StorageError
from device_agent.store import write_atomically

REMEMBERED = 512


class CommandLog:
    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / "commands.json"
        self._lock = threading.Lock()
        self.horizon = 0.0
        entries: list[tuple[str, float]] = []
        doc = _read(self.path)
        if isinstance(doc, list):  # before the horizon: ids alone
            entries = [(i, 0.0) for i in doc if isinstance(i, str)]
        elif isinstance(doc, dict) and isinstance(doc.get("commands"), list):
            entries = [(e[0], float(e[1])) for e in doc["commands"]
                       if isinstance(e, list) and len(e) == 2 and isinstance(e[0], str)
                       and type(e[1]) in (int, float)]
            horizon = doc.get("horizon")
            self.horizon = float(horizon) if type(horizon) in (int, float) else 0.0
        self._entries: deque[tuple[str, float]] = deque(entries, maxlen=REMEMBERED)
        self._ids = {i for i, _ in self._entries}

    def first_time(self, command_id: str, issued_at: float) -> bool:
        """True (and remembered, durably) the first time *command_id* is seen; False after that.
        Raises ProtocolError for a command older than the horizon, and StorageError when it cannot
        be written down (a full disk): then it is not remembered either, and must not run."""
        with self._lock:
            if command_id in self._ids:
                return False
            if issued_at <= self.horizon:
                raise ProtocolError("issued before the oldest command this device still remembers, so it may "
                                    "have run already (played again?)")
            entries = deque(self._entries, maxlen=REMEMBERED)
            horizon = self.horizon
            if len(entries) == REMEMBERED:
                horizon = max(horizon, entries[0][1])
            entries.append((command_id, issued_at))
            try:
                write_atomically(self.path, json.dumps({"commands": [list(e) for e in entries],
                                                        "horizon": horizon}).encode())
            except OSError as exc:
                raise StorageError(f"cannot record it on the device's disk: {exc.strerror or exc}") from None
            self._entries, self.horizon = entries, horizon
            self._ids = {i for i, _ in entries}
            return True


KEPT_REPLIES = 32
MAX_KEPT_REPLY = 64 * 1024


class ReplyLog:
    """The replies the agent sent to its last KEPT_REPLIES answered commands (trust, config,
    certificate, bench), by command id, kept on disk. A host whose connection dropped as a reply
    came loses it (its session is clean); it sends the command again once it is back, and the
    agent, which never runs a command twice, sends the reply it kept instead — restarted meanwhile
    or not. A full disk keeps them in memory only."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / "replies.json"
        self._lock = threading.Lock()
        doc = _read(self.path)
        self._replies: dict[str, str] = {k: v for k, v in doc.items() if isinstance(v, str)} \
            if isinstance(doc, dict) else {}

    def keep(self, command_id: str, payload: bytes) -> None:
        if len(payload) > MAX_KEPT_REPLY:
            return
        with self._lock:
            self._replies.pop(command_id, None)
            self._replies[command_id] = payload.decode()
            while len(self._replies) > KEPT_REPLIES:
                del self._replies[next(iter(self._replies))]
            try:
                write_atomically(self.path, json.dumps(self._replies).encode())
            except OSError:
                pass  # kept in memory: what a host asks again for before a restart is still answered

    def get(self, command_id: str) -> bytes | None:
        with self._lock:
            payload = self._replies.get(command_id)
        return payload.encode() if payload is not None else None


def _read(path: Path):
    """The JSON document in *path*; None if it is missing or not JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
