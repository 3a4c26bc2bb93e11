"""One agent per state directory.

A second agent started on the directory a running agent uses (`edgefleet-agent run --config
/etc/edgefleet/agent.toml` typed while the service runs) would read that agent's update record as
if a crash had left it: count a start attempt, carry the update on beside the agent doing it, and
past ``max_start_attempts`` roll it back. So the first thing an agent does is take an exclusive
lock on ``STATE_DIR/agent.lock``, and a second one stops there, having changed nothing. The kernel
drops the lock when its process ends, however it ends: a killed agent leaves nothing to clean up.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from device_agent.errors import ConfigError

LOCK_NAME = "agent.lock"


class StateDirectoryLock:
    """Held from ``acquire()`` until ``release()`` or the end of the process."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise ConfigError naming the agent that holds it."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = _open(self.path)
        except OSError as exc:
            raise ConfigError(f"cannot use the state directory {self.path.parent}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held (EWOULDBLOCK); the holder wrote its pid after taking it
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            named = holder.isdigit() and Path(f"/proc/{holder}").exists()  # not a dead agent's pid
            raise ConfigError(
                f"another agent{f' (pid {holder})' if named else ''} is already running on the state "
                f"directory {self.path.parent}: stop it first (`systemctl stop edgefleet-agent` for the service), "
                "or give this one a state directory of its own") from None
        try:  # who holds it, for the message above; a read-only lock file (another user's) still locks
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _open(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except PermissionError:  # left by an agent that ran as another user: locking needs no write access
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
