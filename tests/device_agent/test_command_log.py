"""The agent's record of the commands it acted on: a command runs once, however often MQTT (or
someone replaying it) delivers it, for as long as its signature has not expired."""

from __future__ import annotations

import json

import pytest

from device_agent import command_log
from device_agent.command_log import CommandLog, ReplyLog
from device_agent.errors import ProtocolError, StorageError
from tests.conftest import fill_disk


def test_a_command_runs_once_even_across_a_restart(tmp_path):
    log = CommandLog(tmp_path)
    assert log.first_time("c1", 100.0)
    assert not log.first_time("c1", 100.0)
    assert not CommandLog(tmp_path).first_time("c1", 100.0)  # remembered on disk


def test_a_command_pushed_out_of_the_log_cannot_be_played_again(tmp_path, monkeypatch):
    """Once newer commands have pushed its id out, an old signed command — captured off the broker
    and published again before it expires — is refused rather than run a second time."""
    monkeypatch.setattr(command_log, "REMEMBERED", 4)
    log = CommandLog(tmp_path)
    assert log.first_time("rollback-1", 100.0)
    for i in range(4):
        assert log.first_time(f"config-{i}", 200.0 + i)
    with pytest.raises(ProtocolError, match="may have run already"):
        log.first_time("rollback-1", 100.0)
    with pytest.raises(ProtocolError):
        CommandLog(tmp_path).first_time("rollback-1", 100.0)  # after a restart too
    assert CommandLog(tmp_path).first_time("config-9", 300.0)  # newer commands run


def test_a_log_written_before_the_horizon_is_read(tmp_path):
    (tmp_path / "commands.json").write_text(json.dumps(["old-1", "old-2"]))
    log = CommandLog(tmp_path)
    assert not log.first_time("old-1", 50.0)
    assert log.first_time("new-1", 60.0)
    assert json.loads((tmp_path / "commands.json").read_text())["commands"][-1] == ["new-1", 60.0]


@pytest.mark.parametrize("text", ["{", "[1, 2]", '{"commands": [["a"]], "horizon": "x"}', '{"commands": 5}'])
def test_a_damaged_log_is_read_as_far_as_it_goes(tmp_path, text):
    (tmp_path / "commands.json").write_text(text)
    log = CommandLog(tmp_path)
    assert log.first_time("c1", 1.0) and not log.first_time("c1", 1.0)


def test_a_command_that_cannot_be_written_down_is_not_remembered_either(small_disk):
    disk = small_disk(1)
    log = CommandLog(disk)
    assert log.first_time("c1", 100.0)
    filler = fill_disk(disk)
    with pytest.raises(StorageError, match="^cannot record it on the device's disk: No space left on device$"):
        log.first_time("c2", 101.0)
    filler.unlink()
    # not taken for a redelivery of something done: it runs once there is room
    assert log.first_time("c2", 101.0) and not CommandLog(disk).first_time("c2", 101.0)


def test_the_last_replies_are_kept_across_a_restart_and_the_oldest_let_go(tmp_path):
    log = ReplyLog(tmp_path)
    for i in range(command_log.KEPT_REPLIES + 2):
        log.keep(f"c{i}", b'{"n": %d}' % i)
    log.keep("c5", b'{"n": "again"}')  # kept anew, as the newest
    kept = ReplyLog(tmp_path)
    assert kept.get("c0") is None and kept.get("c1") is None and kept.get("c2") == b'{"n": 2}'
    assert kept.get("c5") == b'{"n": "again"}' and kept.get(f"c{command_log.KEPT_REPLIES + 1}") is not None
    log.keep("c-new", b"{}")  # c5 is no longer the oldest: c2 goes
    assert ReplyLog(tmp_path).get("c2") is None and ReplyLog(tmp_path).get("c5") is not None


@pytest.mark.parametrize("text", ["{", "[1, 2]", '{"a": 5, "b": "{}"}'])
def test_damaged_kept_replies_are_read_as_far_as_they_go(tmp_path, text):
    (tmp_path / "replies.json").write_text(text)
    log = ReplyLog(tmp_path)
    assert log.get("a") is None and log.get("b") in (None, b"{}")
    log.keep("c1", b"{}")
    assert ReplyLog(tmp_path).get("c1") == b"{}"


def test_replies_that_cannot_be_written_down_are_kept_in_memory(small_disk):
    disk = small_disk(1)
    log = ReplyLog(disk)
    filler = fill_disk(disk)
    log.keep("c1", b'{"ok": true}')
    assert log.get("c1") == b'{"ok": true}' and ReplyLog(disk).get("c1") is None
    filler.unlink()
