"""One agent per state directory (device_agent/state_lock.py); the agent processes' side is in
tests/test_agent_lifecycle.py."""

import logging
import os
import re
import subprocess

import pytest

from device_agent.errors import ConfigError
from device_agent.state_lock import StateDirectoryLock


def test_a_second_lock_is_refused_naming_the_holder_until_the_first_is_released(tmp_path):
    first = StateDirectoryLock(tmp_path / "state")
    first.acquire()  # (creates the directory, as a first start does)
    with pytest.raises(ConfigError, match=rf"^another agent \(pid {os.getpid()}\) is already running on the state "
                                          rf"directory {re.escape(str(tmp_path / 'state'))}: stop it first"):
        StateDirectoryLock(tmp_path / "state").acquire()
    first.release()
    again = StateDirectoryLock(tmp_path / "state")
    again.acquire()
    again.release()


def test_a_read_only_state_directory_is_locked_through_the_lock_file_there_and_used_unlocked_without_one(
        small_disk, caplog):
    disk = small_disk(1)
    (disk / "used").mkdir()
    (disk / "used" / "agent.lock").touch()  # left by the agents that ran before the remount
    (disk / "new").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)

    holder = StateDirectoryLock(disk / "used")
    holder.acquire()
    with pytest.raises(ConfigError, match=rf"^another agent \(pid {os.getpid()}\) is already running"):
        StateDirectoryLock(disk / "used").acquire()
    holder.release()

    with caplog.at_level(logging.WARNING):
        StateDirectoryLock(disk / "new").acquire()
    assert f"the state directory {disk / 'new'} is read-only" in caplog.text
