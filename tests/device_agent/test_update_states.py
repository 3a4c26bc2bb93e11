"""The update machine's tables, read on their own, and the record they are saved in."""

import json

import pytest

from device_agent.update.record import CorruptRecord, IDLE, UpdateJournal, UpdateRecord
from device_agent.update.states import DONE, FAIL, RECOVERY, STATES, TRANSITIONS, check_tables

BEFORE_LIVE = ["downloading", "verifying", "health_check"]  # the old bundle is still current
LIVE = ["activating", "trial", "committing"]                 # the new bundle may be serving


def test_the_tables_agree_with_each_other():
    check_tables()


def test_a_successful_update_walks_the_documented_path():
    path, state = ["idle"], TRANSITIONS[("idle", "deploy")]
    while state != "idle":
        path.append(state)
        state = TRANSITIONS[(state, DONE)]
    assert path == ["idle", "downloading", "verifying", "health_check", "activating", "trial", "committing"]


@pytest.mark.parametrize("state", BEFORE_LIVE)
def test_failing_before_the_bundle_is_live_only_cleans_up(state):
    assert TRANSITIONS[(state, FAIL)] == "cleanup"


@pytest.mark.parametrize("state", LIVE)
def test_failing_once_the_bundle_may_be_live_rolls_back(state):
    assert TRANSITIONS[(state, FAIL)] == "rolling_back"


def test_every_state_a_crash_can_leave_has_a_recovery():
    assert set(RECOVERY) == set(STATES) | {"idle"}


def test_reentering_a_state_counts_attempts_and_a_new_state_starts_at_one():
    r = UpdateRecord(state="idle").entering("trial")
    assert r.attempts == 1
    assert r.entering("trial").entering("trial").attempts == 3
    assert r.entering("committing").attempts == 1


def test_the_record_round_trips_and_a_missing_file_means_idle(tmp_path):
    journal = UpdateJournal(tmp_path)
    assert journal.load() == IDLE
    record = UpdateRecord(state="trial", command_id="c1", label="m 1.0.0", target="m-1.0.0-abc", attempts=2)
    journal.save(record)
    assert journal.load() == record
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("content", [b"", b"{not json", b"[]", json.dumps({"state": 3}).encode(),
                                     json.dumps({"state": "trial", "surprise": 1}).encode(),
                                     json.dumps({"state": "trial", "attempts": "many"}).encode()])
def test_a_corrupt_record_is_reported_not_trusted(tmp_path, content):
    (tmp_path / "update.json").write_bytes(content)
    with pytest.raises(CorruptRecord):
        UpdateJournal(tmp_path).load()


def _machine(tmp_path):
    """An update machine on a real store and journal, with no broker; returns (machine, events)."""
    from device_agent.bundle.signing import generate_key_pair
    from device_agent.config import AgentConfig
    from device_agent.mqtt import BrokerAddress, MqttClient
    from device_agent.serving import ModelSlot
    from device_agent.store import BundleStore
    from device_agent.telemetry.histogram import LatencyHistogram
    from device_agent.transfer import ChunkRouter
    from device_agent.update.machine import UpdateMachine
    from device_agent.update.states import UpdateContext

    pub = tmp_path / "k.pub"  # (a second machine on the same state directory, as after a restart, shares it)
    if not pub.exists():
        _, pub = generate_key_pair(tmp_path, "k")
    config = AgentConfig(device_id="dev", state_dir=tmp_path / "state", trusted_keys=(pub,))
    events = []
    ctx = UpdateContext(config, MqttClient(client_id="unused", broker=BrokerAddress()), ChunkRouter(),
                        BundleStore(config.state_dir), ModelSlot(LatencyHistogram()), {}, events.append)
    return UpdateMachine(ctx), events


def _deploy(machine):
    from device_agent.protocol.chunks import BundleOffer
    from device_agent.protocol.commands import DeployCommand

    offer = BundleOffer(sha256="ab" * 32, size=10, chunk_size=4, name="m", version="1.0.0")
    return machine.deploy(DeployCommand("c1", offer, 0.0))


def _journal_unwritable(state_dir):
    """Make every save of update.json fail with a real OS error (as a full disk would): it is
    written as update.json.tmp and renamed, and a directory of that name cannot be opened."""
    (state_dir / "update.json.tmp").mkdir(exist_ok=True)


def test_an_unexpected_error_in_a_state_takes_its_fail_edge_and_is_reported(tmp_path, monkeypatch):
    """Found at 1,000 simulated devices: an OSError escaping a state left the update "downloading"
    for good. Any exception now counts as the state failing, with the error as the reason."""
    machine, events = _machine(tmp_path)

    def broken(self, ctx, record):
        raise FileNotFoundError("the disk went away")
    monkeypatch.setattr(type(STATES["downloading"]), "enter", broken)
    event = _deploy(machine)
    assert event.state == "failed" and "downloading failed unexpectedly: the disk went away" in event.reason
    assert [e.state for e in events] == ["accepted", "failed"]
    assert machine.record.state == "idle"  # cleaned up, not stuck


def test_the_devices_log_says_how_each_update_ended_and_why_one_failed(tmp_path, monkeypatch, caplog):
    """journalctl is where someone at the device looks: every command's outcome is one line there,
    a failure a warning with its reason, as the host was told."""
    import logging
    from dataclasses import replace

    machine, _ = _machine(tmp_path)
    monkeypatch.setattr(type(STATES["downloading"]), "enter",
                        lambda self, ctx, record: (FAIL, replace(record, reason="no chunk for 60 s")))
    caplog.set_level(logging.INFO, logger="device_agent.update")
    assert _deploy(machine).reason == "no chunk for 60 s"
    assert machine.rollback("c2").state == "failed"
    outcomes = [(r.levelname, r.getMessage()) for r in caplog.records if ": failed" in r.getMessage()]
    assert outcomes == [("WARNING", "update c1 (m 1.0.0): failed: no chunk for 60 s"),
                        ("WARNING", "update c2 (no bundle): failed: no earlier committed version to roll back to")]


def test_an_update_whose_first_state_cannot_be_saved_does_not_start(tmp_path, monkeypatch):
    machine, events = _machine(tmp_path)
    entered = []
    monkeypatch.setattr(type(STATES["downloading"]), "enter", lambda self, ctx, record: entered.append(1))
    _journal_unwritable(tmp_path / "state")
    event = _deploy(machine)
    assert event.state == "failed" and event.reason == (
        "not started: cannot record the update's state on the device's disk: Is a directory")
    assert [e.state for e in events] == ["accepted", "failed"] and not entered
    assert machine.record.state == "idle" and machine.journal.load().state == "idle"


def test_the_outcome_of_the_last_update_is_kept_across_a_restart(tmp_path, monkeypatch):
    machine, _ = _machine(tmp_path)
    assert machine.last_outcome is None
    monkeypatch.setattr(type(STATES["downloading"]), "enter", lambda self, ctx, record: (FAIL, record))
    event = _deploy(machine)
    assert event.state == "failed" and machine.last_outcome == event
    again, _ = _machine(tmp_path)  # the agent started again on the same state directory
    assert again.last_outcome == event and again.plan_recovery().state == "idle"
    (tmp_path / "state" / "last_update.json").write_text("{half")
    assert _machine(tmp_path)[0].last_outcome is None  # unreadable: not known, the agent still starts


def test_an_update_whose_later_states_cannot_be_saved_goes_on_and_ends_idle(tmp_path, monkeypatch):
    machine, events = _machine(tmp_path)

    def disk_fills(self, ctx, record):  # saved in downloading; from here on nothing can be written
        _journal_unwritable(ctx.config.state_dir)
        return FAIL, record
    monkeypatch.setattr(type(STATES["downloading"]), "enter", disk_fills)
    event = _deploy(machine)
    assert event.state == "failed" and [e.state for e in events] == ["accepted", "failed"]  # cleanup ran
    assert machine.record.state == "idle" and machine.busy_with is None  # not stuck
    assert machine.journal.load().state == "downloading"  # a restart would resume there, and clean up


def test_recovery_goes_on_when_the_disk_is_too_full_to_count_the_attempt(tmp_path):
    machine, _ = _machine(tmp_path)
    machine.journal.save(UpdateRecord(state="trial", kind="deploy", command_id="c1", attempts=1))
    _journal_unwritable(tmp_path / "state")
    record = machine.plan_recovery()  # at start-up, before the local API: it must not raise
    assert (record.state, record.attempts) == ("trial", 2) and machine.record == record
