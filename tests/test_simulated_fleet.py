"""Rollouts over a simulated fleet of 100 devices: `edgefleet simulate` (real agents sharing one
loaded model per process) against a real broker, with the monitor's registry and the CLI."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import pytest

from host_tools.fleet.store import FleetStore
from tests.conftest import edgefleet, wait_until

FLEET = 100


@pytest.fixture
def simulate(tmp_path, mosquitto, monitor, keys):
    """simulate(*flags): start `edgefleet simulate` with 100 devices and wait until the registry
    has them all online; yields the function, stops the simulator afterwards."""
    procs = []

    def start(*flags):
        log = open(tmp_path / f"simulate-{len(procs)}.log", "wb")
        proc = subprocess.Popen([sys.executable, "-m", "host_tools", "simulate", "--devices", str(FLEET),
                                 "--broker", str(mosquitto), "--trusted-key", str(keys["pub"]), "--group", "sim",
                                 "--per-worker", "50", "--telemetry-interval", "1",
                                 "--trial-seconds", "0.2", "--state-dir", str(tmp_path / "sim"),
                                 *map(str, flags)], stderr=log)
        procs.append((proc, log))
        store = FleetStore(monitor)
        ok = wait_until(lambda: sum(r.online for r in sims(store)) == FLEET, 90, 0.5)
        assert ok, (tmp_path / f"simulate-{len(procs) - 1}.log").read_text()[-3000:]
        return store

    yield start
    for proc, log in procs:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
        log.close()


def sims(store):
    """The simulated devices in the registry (the broker still has other tests' devices' statuses)."""
    return [r for r in store.devices() if r.device_id.startswith("sim-")]


def rollout(monitor, mosquitto, bundle, group, *extra):
    """`edgefleet rollout start`, latency not judged: 100 simulated devices downloading on two shared
    cores run their model slower meanwhile (a slower model halting a rollout: tests/test_rollout.py)."""
    result = edgefleet("rollout", "start", bundle, "--group", group, "--db", monitor, "--broker", mosquitto,
                       "--stages", "10,50,100", "--window", "0", "--stage-timeout", "60", "--max-p99-ratio", "1000",
                       "--json", *extra, timeout=400)
    return result.returncode, json.loads(result.stdout), result.stderr


def by_stage(doc):
    stages: dict[int, dict[str, int]] = {}
    for d in doc["devices"]:
        stages.setdefault(d["stage"], {}).setdefault(d["state"], 0)
        stages[d["stage"]][d["state"]] += 1
    return stages


def test_a_staged_rollout_over_100_simulated_devices_completes(simulate, monitor, mosquitto, make_bundle):
    store = simulate("--bundle", make_bundle("1.0.0"))
    assert all(r.active_bundle == "digits-cnn 1.0.0" for r in sims(store))
    code, doc, log = rollout(monitor, mosquitto, make_bundle("2.0.0"), "sim")
    assert code == 0 and doc["state"] == "done", log[-2000:]
    assert by_stage(doc) == {0: {"active": 10}, 1: {"active": 40}, 2: {"active": 50}}
    assert wait_until(lambda: sum(r.active_bundle == "digits-cnn 2.0.0" for r in sims(store)) == FLEET, 30)


def test_when_20_percent_of_the_canary_fails_the_rollout_halts_there_and_rolls_it_back(simulate, monitor, mosquitto,
                                                                                      make_bundle):
    store = simulate("--bundle", make_bundle("1.0.0"), "--reject", "0.2")
    code, doc, log = rollout(monitor, mosquitto, make_bundle("2.0.0"), "sim", "--rollback-on-halt")
    assert code == 1 and doc["state"] == "halted", log[-2000:]
    assert "2 of 10 devices in the stage failed" in doc["reason"]
    # the one fault said once, with the devices it hit
    failed = [d["device_id"] for d in doc["devices"] if d["state"] == "failed"]
    assert (f"health check failed: simulated fault: this device rejects every new model ({', '.join(failed)})"
            in doc["reason"]), doc["reason"]
    # only the canary was sent the bundle: 2 refused it, the 8 that took it went back to 1.0.0
    assert by_stage(doc) == {0: {"failed": 2, "rolled_back": 8}}
    assert wait_until(lambda: sum(r.active_bundle == "digits-cnn 1.0.0" for r in sims(store)) == FLEET, 30)


def test_a_canary_whose_inferences_fail_more_often_than_before_halts_and_is_rolled_back(simulate, monitor,
                                                                                       mosquitto, make_bundle):
    # 2 of the canary's 10 devices fail every fifth call of the new model: 4% of the stage's calls.
    # A call every 0.25 s: after the health check's call and the trial's own, the fifth comes ~0.75 s
    # after the devices' 0.2 s trial begins (at 0.1 s, 0.3 s after: a trial that overran on a loaded
    # machine saw it, and the device rolled itself back: "failed", not rolled back by the host).
    store = simulate("--bundle", make_bundle("1.0.0"), "--errors", "0.2", "--inference-interval", "0.25")
    code, doc, log = rollout(monitor, mosquitto, make_bundle("2.0.0"), "sim", "--window", "4", "--rollback-on-halt")
    assert code == 1 and doc["state"] == "halted", log[-2000:]
    assert "of inference calls on the new version failed" in doc["reason"] and "against 0.0%" in doc["reason"]
    assert by_stage(doc) == {0: {"rolled_back": 10}}, [  # every device took it; all went back
        d for d in doc["devices"] if d["state"] != "rolled_back"]
    assert wait_until(lambda: sum(r.active_bundle == "digits-cnn 1.0.0" for r in sims(store)) == FLEET, 30)


def test_a_canary_on_which_the_new_model_runs_much_slower_halts_and_is_rolled_back(simulate, monitor, mosquitto,
                                                                                    make_bundle):
    store = simulate("--bundle", make_bundle("1.0.0"), "--slow", "1", "--slow-factor", "30",
                     "--inference-interval", "0.1")
    # the previous version's latency on every device, in steady state, is what the canary is compared with
    assert wait_until(lambda: all(store.telemetry_count(r.device_id, "digits-cnn 1.0.0") >= 5 for r in sims(store)),
                      30)
    code, doc, log = rollout(monitor, mosquitto, make_bundle("2.0.0"), "sim", "--window", "4", "--max-p99-ratio", "5",
                             "--rollback-on-halt")
    assert code == 1 and doc["state"] == "halted" and "p99 latency is" in doc["reason"], log[-2000:]
    assert by_stage(doc) == {0: {"rolled_back": 10}}


def test_a_stage_goes_in_waves_and_a_bad_wave_stops_the_next(simulate, monitor, mosquitto, make_bundle):
    store = simulate("--bundle", make_bundle("1.0.0"), "--reject", "0.1")
    code, doc, log = rollout(monitor, mosquitto, make_bundle("2.0.0"), "sim", "--stages", "100",
                             "--max-in-flight", "20", "--max-failure-rate", "0.05")
    assert code == 1 and doc["state"] == "halted" and "2 of 20 devices in the stage failed" in doc["reason"], log
    assert by_stage(doc) == {0: {"active": 18, "failed": 2}}  # the other 80 were never sent it
    assert wait_until(lambda: sum(r.active_bundle == "digits-cnn 2.0.0" for r in sims(store)) == 18, 30)
    # the halt says what is left on the new version, and how to take it back
    rollout_id = doc["rollout_id"]
    assert f"18 device(s) stay on digits-cnn 2.0.0; `edgefleet rollout rollback {rollout_id}` takes them back" in log
    back = edgefleet("rollout", "rollback", rollout_id, "--db", monitor, "--broker", mosquitto, "--json", timeout=120)
    assert back.returncode == 0, back.stderr
    assert sorted(json.loads(back.stdout)) == sorted(d["device_id"] for d in doc["devices"] if d["state"] == "active")
    doc = json.loads(edgefleet("rollout", "status", rollout_id, "--db", monitor, "--json").stdout)
    assert by_stage(doc) == {0: {"rolled_back": 18, "failed": 2}} and doc["state"] == "halted"
    assert {d["reason"] for d in doc["devices"] if d["state"] == "rolled_back"} == {"rolled back: by the operator"}
    assert wait_until(lambda: sum(r.active_bundle == "digits-cnn 1.0.0" for r in sims(store)) == FLEET, 30)
    again = edgefleet("rollout", "rollback", rollout_id, "--db", monitor, "--broker", mosquitto)
    assert again.returncode == 0 and "nothing to roll back" in again.stderr


def test_a_rollout_that_would_go_on_is_not_rolled_back_until_aborted(monitor, mosquitto, make_bundle):
    from host_tools.rollout import RolloutPlan, RolloutStore

    store = RolloutStore(FleetStore(monitor))
    rollout_id = store.create(RolloutPlan(bundle=str(make_bundle("2.0.0")), selectors=["group=sim"]))
    store.set_state(rollout_id, "paused")
    refused = edgefleet("rollout", "rollback", rollout_id, "--db", monitor, "--broker", mosquitto)
    assert refused.returncode == 1
    assert refused.stderr == f"error: rollout {rollout_id} is paused; `edgefleet rollout abort {rollout_id}` first\n"
    assert store.get(rollout_id)["state"] == "paused"
    assert edgefleet("rollout", "abort", rollout_id, "--db", monitor).returncode == 0
    nothing = edgefleet("rollout", "rollback", rollout_id, "--db", monitor, "--broker", mosquitto)
    assert nothing.returncode == 0 and "nothing to roll back" in nothing.stderr


@pytest.mark.waits
def test_devices_that_go_offline_mid_rollout_get_the_bundle_when_they_return(simulate, monitor, mosquitto,
                                                                            make_bundle):
    store = simulate("--bundle", make_bundle("1.0.0"), "--offline", "0.1", "--offline-for", "12")
    started = time.monotonic()
    code, doc, log = rollout(monitor, mosquitto, make_bundle("2.0.0"), "sim", "--stage-timeout", "5",
                             "--pending-timeout", "120")
    assert code == 0 and doc["state"] == "done", log[-2000:]
    assert {d["state"] for d in doc["devices"]} == {"active"} and len(doc["devices"]) == FLEET
    assert re.search(r"waiting for \d+ pending device\(s\)", log)  # they missed their stage, came back later
    assert time.monotonic() - started >= 12
    assert sum(r.active_bundle == "digits-cnn 2.0.0" for r in sims(store)) == FLEET


@pytest.mark.waits
def test_devices_still_offline_at_the_end_are_reported_pending_and_resume_sends_them_the_bundle(
        simulate, monitor, mosquitto, make_bundle):
    # The five that go offline (every 20th) are all in the second of two stages, which waits 15 s
    # for them; they stay away twice that from the deploy command, so they are away when it ends.
    store = simulate("--bundle", make_bundle("1.0.0"), "--offline", "0.05", "--offline-for", "30")
    code, doc, log = rollout(monitor, mosquitto, make_bundle("2.0.0"), "sim", "--stages", "10,100",
                             "--stage-timeout", "15", "--pending-timeout", "0")
    assert code == 1 and doc["state"] == "pending" and "rollout resume" in doc["reason"], log[-2000:]
    pending = sorted(d["device_id"] for d in doc["devices"] if d["state"] == "pending")
    assert pending == [f"sim-{i:04d}" for i in range(19, 100, 20)]  # 5%: every 20th device
    assert {d["state"] for d in doc["devices"] if d["device_id"] not in pending} == {"active"}
    # they come back with no rollout running; `resume` (as after a host restart) finishes the job
    assert wait_until(lambda: sum(r.online for r in sims(store)) == FLEET, 90)

    def updating():  # the registry's in-flight bundle: they took up the old command, nobody serves it
        listed = json.loads(edgefleet("devices", "list", "--db", monitor, "--group", "sim", "--json").stdout)
        return {d["device_id"]: d["in_flight"] for d in listed if d["in_flight"]}
    assert wait_until(lambda: sorted(updating()) == pending, 60, 1.0), updating()
    assert {u["bundle"] for u in updating().values()} == {"digits-cnn 2.0.0"}
    result = edgefleet("rollout", "resume", doc["rollout_id"], "--pending-timeout", "60", "--db", monitor,
                       "--broker", mosquitto, "--json", timeout=300)
    resumed = json.loads(result.stdout)
    assert result.returncode == 0 and resumed["state"] == "done", result.stderr[-2000:]
    # (those that finished the first command once the resumed rollout served the bundle answer the
    # second with already_installed)
    assert {d["state"] for d in resumed["devices"]} <= {"active", "already_installed"}
    assert wait_until(lambda: sum(r.active_bundle == "digits-cnn 2.0.0" for r in sims(store)) == FLEET, 30)


def start_in_background(tmp_path, monitor, mosquitto, bundle, *extra):
    """`edgefleet rollout start` as its own process, latency not judged (see rollout()); returns
    (process, rollout id, stderr path)."""
    err = tmp_path / f"rollout-{time.monotonic_ns()}.log"
    with open(err, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "host_tools", "rollout", "start", str(bundle), "--group", "sim",
                                 "--db", str(monitor), "--broker", str(mosquitto), "--stages", "10,50,100",
                                 "--stage-timeout", "60", "--max-p99-ratio", "1000", "--json", *map(str, extra)],
                                stdout=subprocess.PIPE,
                                stderr=log)
    found = wait_until(lambda: re.search(r"rollout (\S+) started", err.read_text()), 30)
    assert found, err.read_text()
    return proc, found.group(1), err


def rollout_doc(monitor, rollout_id):
    result = edgefleet("rollout", "status", rollout_id, "--db", monitor, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("how", ["killed", "ctrl-c"])
def test_a_rollout_survives_its_host_process_being_stopped_and_resumes_where_it_was(simulate, monitor, mosquitto,
                                                                                    make_bundle, tmp_path, how):
    store = simulate("--bundle", make_bundle("1.0.0"))
    proc, rollout_id, err = start_in_background(tmp_path, monitor, mosquitto, make_bundle("2.0.0"), "--window", "3")
    assert wait_until(lambda: rollout_doc(monitor, rollout_id)["stage"] >= 1, 60)  # into the second stage
    if how == "killed":
        proc.kill()  # the host goes away mid-rollout, without a word
        proc.wait(10)
        doc = rollout_doc(monitor, rollout_id)
        assert doc["state"] == "running" and doc["stage"] >= 1
    else:  # the operator stops following it: it is paused, and told how to go on
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 130
        doc = rollout_doc(monitor, rollout_id)
        stage = f"stage {doc['stage'] + 1}/3"
        assert doc["state"] == "paused" and doc["reason"] == f"interrupted (Ctrl-C) at {stage}"
        said = err.read_text().strip().splitlines()[-1]
        assert said == (f"stopped driving rollout {rollout_id} at {stage} and paused it: devices still downloading "
                        f"stall without its chunks; `edgefleet rollout resume {rollout_id}` sends them the bundle "
                        f"again and carries on, `edgefleet rollout abort {rollout_id}` ends it"), err.read_text()
    result = edgefleet("rollout", "resume", rollout_id, "--db", monitor, "--broker", mosquitto, "--json", timeout=300)
    doc = json.loads(result.stdout)
    assert result.returncode == 0 and doc["state"] == "done", result.stderr[-2000:]
    assert len(doc["devices"]) == FLEET and {d["state"] for d in doc["devices"]} <= {"active", "already_installed"}
    assert wait_until(lambda: sum(r.active_bundle == "digits-cnn 2.0.0" for r in sims(store)) == FLEET, 30)


def test_pause_stops_a_rollout_before_its_next_stage_and_abort_ends_it(simulate, monitor, mosquitto, make_bundle,
                                                                       tmp_path):
    store = simulate("--bundle", make_bundle("1.0.0"))
    proc, rollout_id, err = start_in_background(tmp_path, monitor, mosquitto, make_bundle("2.0.0"), "--window", "5")
    assert wait_until(lambda: "watching stage 1" in err.read_text(), 60), err.read_text()
    paused = edgefleet("rollout", "pause", rollout_id, "--db", monitor)
    assert paused.returncode == 0 and "paused" in paused.stdout
    assert proc.wait(60) == 0  # the controller stops before stage 2 and says so
    assert "stopping before stage 2" in err.read_text()
    # the progress line: devices per state, e.g. "stage 1: 8 active" or "stage 1: 2 activating, 8 active"
    assert re.search(r"^\s*stage 1: \d+ [a-z_]+(, \d+ [a-z_]+)*$", err.read_text(), re.MULTILINE), err.read_text()
    doc = rollout_doc(monitor, rollout_id)
    assert doc["state"] == "paused" and len(doc["devices"]) == 10  # only the canary has it
    listed = json.loads(edgefleet("rollout", "list", "--db", monitor, "--json").stdout)
    assert [(d["rollout_id"], d["state"]) for d in listed] == [(rollout_id, "paused")]
    aborted = edgefleet("rollout", "abort", rollout_id, "--db", monitor)
    assert aborted.returncode == 0 and rollout_doc(monitor, rollout_id)["state"] == "aborted"
    refused = edgefleet("rollout", "resume", rollout_id, "--db", monitor, "--broker", mosquitto)
    assert refused.returncode == 1 and "aborted; only a running, paused or pending one resumes" in refused.stderr
    assert sum(r.active_bundle == "digits-cnn 2.0.0" for r in sims(store)) == 10


def test_the_simulator_stops_promptly_though_its_broker_has_gone(tmp_path, keys):
    """Each device's connection lingers up to a second in its reconnect back-off: one after another,
    100 devices took ~50 s to stop, past the 60 s after which a stopping fleet's workers are killed."""
    from tests.conftest import Mosquitto

    broker = Mosquitto(tmp_path)
    broker.start()
    err = tmp_path / "simulate.log"
    with open(err, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "host_tools", "simulate", "--devices", "100", "--per-worker",
                                 "100", "--broker", str(broker.address), "--trusted-key", str(keys["pub"]),
                                 "--prefix", "gone", "--state-dir", str(tmp_path / "sim")], stderr=log)
    try:
        assert wait_until(lambda: "100 devices: 100 online" in err.read_text(), 90, 0.5), err.read_text()[-2000:]
        broker.stop()
        time.sleep(2)  # every device has lost its connection and is trying to get it back
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, err.read_text()[-2000:]
        assert time.monotonic() - started < 20, err.read_text()[-2000:]
    finally:
        proc.kill()
        broker.stop()
