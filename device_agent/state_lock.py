"""One agent per state directory.

A second agent started on the directory a running agent uses (`edgefleet-agent run --config
/etc/edgefleet/agent.toml` typed while the service runs) would read that agent's update record as
if a crash had left it: count a start attempt, carry the update on beside the agent doing it, and
past ``max_start_attempts`` roll it back. So the first thing an agent does is take an exclusive
lock on ``STATE_DIR/agent.lock``, and a second one stops there, having changed nothing. The kernel
drops the lock when its process ends, however it ends: a killed agent leaves nothing to clean up.

On a read-only state directory (an SD card the kernel remounted read-only after errors) the agent
still starts and serves its model, as it did before the lock: it locks the lock file it finds
there, or, with none there, runs unlocked — a second agent could not change anything
on that disk either.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from pathlib import Path

from device_agent.errors import ConfigError

log = logging.getLogger(__name__)
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
            if exc.errno == errno.EROFS:
                log.warning("the state directory %s is read-only: updates cannot be recorded, and it is not locked "
                            "against a second agent", self.path.parent)
                return
            raise ConfigError(f"cannot use the state directory {self.path.parent}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held (EWOULDBLOCK)
            holder = _holder(fd)
            os.close(fd)
            raise ConfigError(
                f"another agent{f' (pid {holder})' if holder else ''} is already running on the state "
                f"directory {self.path.parent}: stop it first (`systemctl stop edgefleet-agent` for the service), "
                "or give this one a state directory of its own") from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _open(path: Path) -> int:
    # Read-only, as a lock needs no more: it opens a lock file an agent running as another user
    # left, and on a read-only disk the one found there.
    return os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)


def _holder(fd: int) -> int | None:
    """The pid of the process holding a flock on *fd*'s file, as the kernel lists it in /proc/locks
    ("1: FLOCK  ADVISORY  WRITE 7706 fe:00:2146765 0 EOF"); None where it does not say (0: a process
    in another pid namespace)."""
    st = os.fstat(fd)
    file = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == file and fields[4].isdigit():
            return int(fields[4]) or None
    return None
