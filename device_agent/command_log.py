"""Command ids the agent has acted on, kept on disk: MQTT delivers at least once, and a
command redelivered after a restart must not run twice."""

from __future__ import annotations

import json
import threading
from collections import deque
from pathlib import Path

from device_agent.store import write_atomically

REMEMBERED = 512


class CommandLog:
    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / "commands.json"
        self._lock = threading.Lock()
        try:
            ids = json.loads(self.path.read_text())
            ids = [i for i in ids if isinstance(i, str)] if isinstance(ids, list) else []
        except (OSError, ValueError):
            ids = []
        self._ids: deque[str] = deque(ids, maxlen=REMEMBERED)
        self._set = set(self._ids)

    def first_time(self, command_id: str) -> bool:
        """True (and remembered, durably) the first time *command_id* is seen; False after that."""
        with self._lock:
            if command_id in self._set:
                return False
            if len(self._ids) == self._ids.maxlen:
                self._set.discard(self._ids[0])
            self._ids.append(command_id)
            self._set.add(command_id)
            write_atomically(self.path, json.dumps(list(self._ids)).encode())
            return True
