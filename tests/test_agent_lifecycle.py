"""The update lifecycle with real agent processes, a real Mosquitto and real runtimes.

Like Mender's ``Killed_in_<State>`` cases: the agent is SIGKILLed in every state of the
update machine, restarted, and must either finish the update or be back on the previous
bundle — answering correctly on its local API throughout.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from device_agent.bundle.signing import load_private_key
from device_agent.local_api import AgentClient, InferenceClient
from device_agent.mqtt import MqttClient
from device_agent.protocol import topics
from device_agent.protocol.commands import DeployCommand, RollbackCommand
from device_agent.protocol.reports import DeploymentEvent
from device_agent.protocol.signed import sign_command
from device_agent.update import STATES
from device_agent.update.faults import CRASH_ENV, HOLD_ENV
from host_tools.serve import BundleServer
from tests.conftest import MODELS, announced, edgefleet, fill_disk, free_port, wait_until

V1, V2 = "digits-cnn 1.0.0", "digits-cnn 2.0.0"


def host_command(*args) -> subprocess.Popen:
    """A host CLI command running in the background, as an operator's terminal would."""
    return subprocess.Popen([sys.executable, "-m", "host_tools", *map(str, args), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def outcome(proc: subprocess.Popen, device: str, timeout: float = 90) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert out, err
    return json.loads(out)[device]


def deploy(bundle, device, broker, timeout=60) -> dict:
    return outcome(host_command("deploy", bundle, "--device", device, "--broker", broker, "--timeout", timeout,
                                "--chunk-size", 8192), device)


def status(agent) -> dict:
    with AgentClient(agent.control_socket, timeout=10) as client:
        return client.status()


def local_rollback(agent, *flags) -> subprocess.CompletedProcess:
    """`edgefleet-agent rollback` typed on the device."""
    return subprocess.run([sys.executable, "-m", "device_agent", "rollback", "--control-socket",
                           str(agent.control_socket), *flags], capture_output=True, text=True, timeout=60)


def status_unless_it_exits(agent, timeout: float = 30) -> dict | None:
    """The status of a just (re)started agent once its control socket answers (a loaded machine can
    take more than a second to start one), or None if the process exits first."""
    def answer():
        if agent.proc.poll() is not None:
            return "exited"
        try:
            return status(agent)
        except ConnectionError:  # not listening yet (a killed agent leaves its socket file behind)
            return None
    now = wait_until(answer, timeout)
    assert now, f"{agent.device_id} neither answered nor exited in {timeout} s"
    return None if now == "exited" else now


def assert_answers_correctly(agent, expected_logits) -> None:
    x, want = expected_logits
    with InferenceClient(agent.api_socket, timeout=10) as model:
        got = model.infer({"image": x})["logits"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


class Hammer:
    """Clients calling the local API in a loop until stopped, counting right, wrong and failed answers."""

    def __init__(self, agent, expected_logits, formats=("raw",)) -> None:
        self.x, self.want = expected_logits
        self.counts = {"ok": 0, "failed": 0, "wrong": 0}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(agent, fmt)) for fmt in formats]

    def __enter__(self) -> "Hammer":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def _run(self, agent, fmt: str) -> None:
        with InferenceClient(agent.api_socket, timeout=30) as model:
            while not self._stop.is_set():
                try:
                    got = model.infer({"image": self.x}, format=fmt)["logits"]
                except Exception as exc:  # noqa: BLE001 - any failure is what the tests count
                    self.counts["failed"] += 1
                    self.errors.append(repr(exc))
                    continue
                self.counts["ok" if np.allclose(got, self.want, rtol=1e-4, atol=1e-4) else "wrong"] += 1


def start_on_v1(agents, make_bundle, mosquitto, device, **options):
    agent = agents.start(device, **options)
    assert agent.wait_for_api() and announced(mosquitto, device), agent.log.read_text()
    assert deploy(make_bundle("1.0.0"), device, mosquitto)["state"] == "active"
    return agent


def restart(agent, env=None):
    agent.kill()
    agent.start(env)
    assert agent.wait_for_api(), agent.log.read_text()[-3000:]


# state -> (how to reach it, what the device runs once the restarted agent is done, the host's outcome)
KILLED_IN = {
    "downloading":  ("deploy v2",       V2, "active"),
    "verifying":    ("deploy v2",       V2, "active"),
    "health_check": ("deploy v2",       V2, "active"),
    "activating":   ("deploy v2",       V2, "active"),
    "trial":        ("deploy v2",       V2, "active"),
    "committing":   ("deploy v2",       V2, "active"),
    "cleanup":      ("deploy broken",   V1, "failed"),
    "rolling_back": ("rollback to v1",  V1, "rolled_back"),
}


def test_the_kill_table_has_a_row_for_every_state():
    assert set(KILLED_IN) == set(STATES)


@pytest.mark.parametrize("state", list(KILLED_IN))
def test_killed_in_state(state, agents, mosquitto, make_bundle, forge_bundle, expected_logits):
    how, runs_after, host_sees = KILLED_IN[state]
    device = f"kill-{state.replace('_', '-')}"
    agent = start_on_v1(agents, make_bundle, mosquitto, device)
    if how == "rollback to v1":
        assert deploy(make_bundle("2.0.0"), device, mosquitto)["state"] == "active"
    restart(agent, env={HOLD_ENV: state})

    if how == "rollback to v1":
        host = host_command("rollback", "--device", device, "--broker", mosquitto, "--timeout", 90)
    else:
        bundle = make_bundle("2.0.0") if how == "deploy v2" else forge_bundle(f"2.0.{len(state)}", output_offset=5.0)
        host = host_command("deploy", bundle, "--device", device, "--broker", mosquitto, "--timeout", 90,
                            "--chunk-size", 8192)
    held = agent.state_dir / f"held-in-{state}"
    assert wait_until(held.exists, 60), agent.log.read_text()[-3000:]
    held.unlink()
    restart(agent)  # SIGKILL in the state, then a plain start, as systemd would
    with Hammer(agent, expected_logits) as hammer:  # from the first moment the API is up to the end
        result = outcome(host, device)
    assert hammer.counts["failed"] == hammer.counts["wrong"] == 0, hammer.errors[:3]
    assert hammer.counts["ok"] > 0
    assert result["state"] == host_sees, result
    assert wait_until(lambda: status(agent)["update_state"] == "idle", 30)
    assert status(agent)["active_bundle"] == runs_after
    assert_answers_correctly(agent, expected_logits)


def test_bad_models_are_refused_each_with_its_own_reason(agents, mosquitto, make_bundle, forge_bundle,
                                                         expected_logits):
    agent = start_on_v1(agents, make_bundle, mosquitto, "bad-models")
    cases = {
        "does not load": forge_bundle("3.0.0", model_bytes=b"\x08\x07garbage, not a protobuf"),
        "differs from the expected sample output": forge_bundle("3.0.1", output_offset=1.0),
        "too slow": make_bundle("3.0.2", latency_budget_ms=1e-6),
    }
    for reason, bundle in cases.items():
        result = deploy(bundle, "bad-models", mosquitto)
        assert result["state"] == "failed" and reason in result["reason"], result
        assert status(agent)["active_bundle"] == V1
        assert_answers_correctly(agent, expected_logits)
    # nothing of the refused versions is left on the device
    current = (agent.state_dir / "current").resolve().name
    assert [p.name for p in (agent.state_dir / "bundles").iterdir()] == [current]


def test_an_update_with_no_room_on_the_device_is_refused_before_download_and_the_old_model_serves_on(
        agents, mosquitto, make_bundle, padded_bundle, small_disk, expected_logits):
    agent = start_on_v1(agents, make_bundle, mosquitto, "small-card", state_dir=small_disk(6) / "state")
    result = deploy(padded_bundle("1.0.0", 8), "small-card", mosquitto)  # a few KiB to fetch, 8 MiB unpacked
    assert result["state"] == "failed", result
    assert re.fullmatch(r"refused before download: not enough disk space: the bundle needs \d+ KiB to download "
                        r"and 8\.0 MiB unpacked, [\d.]+ MiB are free", result["reason"]), result
    assert status(agent)["active_bundle"] == V1
    assert_answers_correctly(agent, expected_logits)
    assert not list((agent.state_dir / "downloads").iterdir())
    bench = edgefleet("bench", padded_bundle("1.0.0", 8), "--device", "small-card", "--broker", mosquitto)
    assert bench.returncode == 1 and "not enough disk space" in bench.stderr and "8.0 MiB unpacked" in bench.stderr
    assert deploy(padded_bundle("1.1.0", 2), "small-card", mosquitto)["state"] == "active"  # one that fits


def test_a_device_whose_disk_is_full_refuses_commands_at_once_serves_on_and_takes_them_once_there_is_room(
        agents, mosquitto, make_bundle, small_disk, tmp_path, expected_logits):
    disk = small_disk(8)
    agent = start_on_v1(agents, make_bundle, mosquitto, "full-card", state_dir=disk / "state",
                        log=tmp_path / "agent.log")  # (the log elsewhere: it could not be written either)
    filler = fill_disk(disk)
    refused = "command refused: cannot record it on the device's disk: No space left on device"
    started = time.monotonic()
    assert deploy(make_bundle("2.0.0"), "full-card", mosquitto) == {
        "device_id": "full-card", "state": "failed", "progress": 0.0, "reason": refused}
    rollback = edgefleet("rollback", "--device", "full-card", "--broker", mosquitto, "--json")
    assert rollback.returncode == 1 and json.loads(rollback.stdout)["full-card"]["reason"] == refused
    config = edgefleet("device", "config", "full-card", "--set", "telemetry_interval=2", "--broker", mosquitto)
    assert config.returncode == 1 and refused in config.stderr
    assert time.monotonic() - started < 30  # answered, not waited out
    shown = edgefleet("device", "status", "full-card", "--broker", mosquitto)  # asking writes nothing
    assert shown.returncode == 0 and "active bundle: digits-cnn 1.0.0" in shown.stdout
    assert re.search(r"^disk: +[\d.]+ (bytes|KiB) free of 8\.0 MiB \(where the bundles are kept\)$", shown.stdout, re.M)
    assert status(agent)["active_bundle"] == V1
    assert_answers_correctly(agent, expected_logits)
    filler.unlink()
    assert deploy(make_bundle("2.0.0"), "full-card", mosquitto)["state"] == "active"
    assert agent.proc.poll() is None and "Traceback" not in agent.log.read_text()


def test_an_agent_restarted_on_a_full_disk_serves_its_model_and_says_why_an_update_cannot_start(
        agents, mosquitto, make_bundle, small_disk, tmp_path, expected_logits):
    disk = small_disk(8)
    agent = start_on_v1(agents, make_bundle, mosquitto, "boot-full", state_dir=disk / "state",
                        log=tmp_path / "agent.log")
    agent.terminate()
    filler = fill_disk(disk)  # a log gone wild while it was down (or a power cut and a reboot)
    shown = subprocess.run([sys.executable, "-m", "device_agent", "status", "--state-dir", agent.state_dir,
                            "--control-socket", agent.control_socket], capture_output=True, text=True, timeout=30)
    assert "agent:         not running" in shown.stdout, shown.stderr
    assert re.search(r"^disk: +[\d.]+ (bytes|KiB) free of 8\.0 MiB \(where the bundles are kept\)$", shown.stdout, re.M)
    agent.start()
    assert agent.wait_for_api(), agent.log.read_text()[-3000:]  # not a crash loop under systemd
    assert_answers_correctly(agent, expected_logits)
    assert status(agent)["active_bundle"] == V1
    rollback = local_rollback(agent)
    assert rollback.returncode == 1 and rollback.stdout.strip() == (
        "failed: not started: cannot record the update's state on the device's disk: No space left on device")
    filler.unlink()
    assert wait_until(lambda: status(agent)["connected"], 30)
    assert deploy(make_bundle("2.0.0"), "boot-full", mosquitto)["state"] == "active"
    assert "Traceback" not in agent.log.read_text()


def test_an_agent_on_a_state_directory_remounted_read_only_serves_its_model_and_still_keeps_it_to_itself(
        agents, mosquitto, make_bundle, small_disk, tmp_path, expected_logits):
    # The kernel remounts a failing SD card read-only; the device must keep serving what it runs.
    disk = small_disk(8)
    agent = start_on_v1(agents, make_bundle, mosquitto, "ro-card", state_dir=disk / "state",
                        log=tmp_path / "agent.log")
    agent.terminate()
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    agent.start()
    assert agent.wait_for_api(), agent.log.read_text()[-3000:]
    assert_answers_correctly(agent, expected_logits)
    assert status(agent)["active_bundle"] == V1
    second = agents.start("ro-card", state_dir=agent.state_dir, log=tmp_path / "second.log")
    assert second.proc.wait(30) == 1 and f"error: another agent (pid {agent.proc.pid}) is already running on the " \
        "state directory" in second.log.read_text()
    rollback = local_rollback(agent)
    assert rollback.returncode == 1 and rollback.stdout.strip() == (
        "failed: not started: cannot record the update's state on the device's disk: Read-only file system")
    subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)  # the card repaired
    assert deploy(make_bundle("2.0.0"), "ro-card", mosquitto)["state"] == "active"
    assert "Traceback" not in agent.log.read_text()


def test_a_crash_loop_after_activation_ends_in_rollback(agents, mosquitto, make_bundle, expected_logits):
    agent = start_on_v1(agents, make_bundle, mosquitto, "crashy")
    restart(agent, env={CRASH_ENV: "trial"})  # from now on the agent dies whenever v2 goes live
    host = host_command("deploy", make_bundle("2.0.0"), "--device", "crashy", "--broker", mosquitto,
                        "--timeout", 90, "--chunk-size", 8192)
    crashes = 0
    for _ in range(10):  # restart it like systemd's Restart=on-failure
        agent.proc.wait(60)
        crashes += 1
        agent.start({CRASH_ENV: "trial"})
        time.sleep(1.5)
        if (now := status_unless_it_exits(agent)) is not None and now["update_state"] == "idle":
            break
    assert crashes == 3  # v2 went live three times (the limit); the fourth start rolled back
    result = outcome(host, "crashy")
    assert result["state"] == "failed" and "crash loop" in result["reason"] and "rolled back to " + V1 in result["reason"]
    assert status(agent)["active_bundle"] == V1
    assert_answers_correctly(agent, expected_logits)


def test_a_second_agent_on_a_running_agents_state_directory_stops_before_touching_its_update(
        agents, mosquitto, make_bundle, expected_logits, tmp_path):
    # `edgefleet-agent run --config /etc/edgefleet/agent.toml` typed while the service is mid-update:
    # without the state directory's lock it would take the update record for one a crash left, count
    # starts against it (rolling it back past max_start_attempts) and carry it on beside the service.
    agent = start_on_v1(agents, make_bundle, mosquitto, "taken")
    restart(agent, env={HOLD_ENV: "trial"})
    host = host_command("deploy", make_bundle("2.0.0"), "--device", "taken", "--broker", mosquitto,
                        "--timeout", 90, "--chunk-size", 8192)
    held = agent.state_dir / "held-in-trial"
    assert wait_until(held.exists, 60), agent.log.read_text()[-3000:]
    record = (agent.state_dir / "update.json").read_bytes()
    for n in range(4):  # one more than max_start_attempts
        second = agents.start("taken", state_dir=agent.state_dir, log=tmp_path / f"second-{n}.log")
        assert second.proc.wait(30) == 1
        said = second.log.read_text()
        assert said == (f"error: another agent (pid {agent.proc.pid}) is already running on the state directory "
                        f"{agent.state_dir}: stop it first (`systemctl stop edgefleet-agent` for the service), "
                        "or give this one a state directory of its own\n"), said
    assert (agent.state_dir / "update.json").read_bytes() == record
    assert agent.proc.poll() is None and status(agent)["active_bundle"] == V2
    assert_answers_correctly(agent, expected_logits)
    held.unlink()
    restart(agent)  # a killed agent's lock goes with its process: the next one starts and finishes
    assert outcome(host, "taken")["state"] == "active"
    assert status(agent)["active_bundle"] == V2


def test_a_duplicate_command_installs_once_even_across_a_restart(agents, mosquitto, make_bundle, keys):
    agent = agents.start("dupes")
    assert agent.wait_for_api() and announced(mosquitto, "dupes")
    events: list[DeploymentEvent] = []
    host = MqttClient(client_id="test-dupes", broker=mosquitto)
    host.subscribe(topics.events("dupes"), lambda t, p: events.append(DeploymentEvent.from_payload(p)))
    host.connect()
    server = BundleServer(host, chunk_size=8192)
    server.start()
    try:
        offer = server.offer(make_bundle("1.0.0"), "digits-cnn", "1.0.0")
        command = sign_command(DeployCommand("dup-1", offer, time.time()).to_payload(), load_private_key(keys["key"]))
        host.publish(topics.command("dupes"), command)
        assert wait_until(lambda: any(e.state == "active" for e in events), 30), \
            ([(e.state, e.reason) for e in events], server.stats, agent.log.read_text()[-2000:])
        # "active" goes out in committing, before the update's record moves on: killed in between, the
        # agent commits again and says "active" again (test_killed_in_state[committing]), as it must.
        assert wait_until(lambda: status(agent)["update_state"] == "idle", 30)
        host.publish(topics.command("dupes"), command)  # the broker redelivers, or the host retries
        restart(agent)
        host.publish(topics.command("dupes"), command)
        time.sleep(3)
    finally:
        server.stop()
        host.disconnect()
    assert [e.state for e in events].count("accepted") == 1
    assert [e.state for e in events].count("active") == 1
    assert "delivered again" in agent.log.read_text()


def test_a_signed_command_older_than_what_the_device_remembers_is_refused_with_its_reason(
        agents, mosquitto, keys, tmp_path):
    """Its id may have been pushed out of the device's command log by newer ones: it may have run,
    so it does not run (a rollback captured off the broker and played again days later)."""
    agent = agents.start("replayed")
    assert agent.wait_for_api() and announced(mosquitto, "replayed")
    assert agent.terminate() == 0
    # As if 512 commands newer than this one had been carried out since it was issued.
    issued = time.time() - 3600
    (agent.state_dir / "commands.json").write_text(json.dumps({"commands": [], "horizon": issued + 60}))
    agent.start()
    assert agent.wait_for_api() and announced(mosquitto, "replayed")
    events: list[DeploymentEvent] = []
    host = MqttClient(client_id=f"test-replay-{time.time_ns()}", broker=mosquitto)
    host.subscribe(topics.events("replayed"), lambda t, p: events.append(DeploymentEvent.from_payload(p)))
    host.connect()
    try:
        time.sleep(0.3)
        command = sign_command(RollbackCommand("captured-1", issued).to_payload(), load_private_key(keys["key"]))
        host.publish(topics.command("replayed"), command)
        assert wait_until(lambda: events, 15), agent.log.read_text()[-2000:]
    finally:
        host.disconnect()
    assert events[0].state == "failed" and "may have run already" in events[0].reason


def test_a_command_sent_while_the_device_is_offline_is_carried_out_when_it_returns(
        agents, mosquitto, make_bundle):
    agent = agents.start("sleepy")
    # Once it has announced itself, its persistent session exists at the broker (the local API
    # answers earlier: the agent connects in the background, after asking whether its id is free).
    assert agent.wait_for_api() and announced(mosquitto, "sleepy")
    assert agent.terminate() == 0
    host = host_command("deploy", make_bundle("1.0.0"), "--device", "sleepy", "--broker", mosquitto,
                        "--timeout", 60, "--chunk-size", 8192)
    time.sleep(2)
    agent.start()
    assert outcome(host, "sleepy")["state"] == "active"


def test_the_same_version_again_is_already_installed(agents, mosquitto, make_bundle):
    start_on_v1(agents, make_bundle, mosquitto, "again")
    assert deploy(make_bundle("1.0.0"), "again", mosquitto)["state"] == "already_installed"


def test_rollback_over_mqtt_and_locally_and_old_versions_are_pruned(agents, mosquitto, make_bundle,
                                                                   expected_logits):
    agent = start_on_v1(agents, make_bundle, mosquitto, "roller", extra_args=("--keep-versions", "2"))
    for version in ("2.0.0", "3.0.0"):
        assert deploy(make_bundle(version), "roller", mosquitto)["state"] == "active"
    kept = status(agent)["committed"]
    assert kept == ["digits-cnn 2.0.0", "digits-cnn 3.0.0"]  # keep 2: 1.0.0 is gone from disk
    assert len(list((agent.state_dir / "bundles").iterdir())) == 2

    result = edgefleet("rollback", "--device", "roller", "--broker", mosquitto, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["roller"]["state"] == "rolled_back"
    assert status(agent)["active_bundle"] == "digits-cnn 2.0.0"
    assert_answers_correctly(agent, expected_logits)

    # nothing earlier is kept, so a second rollback (here, locally) refuses and changes nothing
    local = local_rollback(agent, "--json")
    assert local.returncode == 1 and "no earlier committed version" in local.stdout
    assert status(agent)["active_bundle"] == "digits-cnn 2.0.0"

    shown = subprocess.run([sys.executable, "-m", "device_agent", "status", "--control-socket",
                            agent.control_socket, "--json"], capture_output=True, text=True, timeout=30)
    assert json.loads(shown.stdout)["active_bundle"] == "digits-cnn 2.0.0"
    remote = edgefleet("device", "status", "roller", "--broker", mosquitto, "--json")
    assert json.loads(remote.stdout)["committed"] == ["digits-cnn 2.0.0"]


def test_the_inference_api_drops_no_request_during_swaps_and_rollbacks(agents, mosquitto, make_bundle,
                                                                       expected_logits):
    agent = start_on_v1(agents, make_bundle, mosquitto, "busy", inference_interval=0)
    with Hammer(agent, expected_logits, formats=("raw", "npz", "json")) as hammer:
        assert deploy(make_bundle("2.0.0"), "busy", mosquitto)["state"] == "active"
        assert edgefleet("rollback", "--device", "busy", "--broker", mosquitto).returncode == 0
        assert deploy(make_bundle("3.0.0"), "busy", mosquitto)["state"] == "active"
    assert hammer.counts["failed"] == 0 and hammer.counts["wrong"] == 0, hammer.errors[:3]
    assert hammer.counts["ok"] > 200


def test_the_agent_serves_and_reports_a_tflite_bundle(agents, mosquitto, make_bundle, expected_logits):
    agent = agents.start("tflite-pi")
    assert agent.wait_for_api() and announced(mosquitto, "tflite-pi")
    bundle = make_bundle("1.0.0", name="digits-tflite", model=MODELS / "digits_cnn.tflite",
                         input_name="serving_default_args_0")
    assert deploy(bundle, "tflite-pi", mosquitto)["state"] == "active"
    x, want = expected_logits
    with InferenceClient(agent.api_socket) as model:
        described = model.describe()
        assert described["runtime"] == "tflite" and described["bundle"] == "digits-tflite 1.0.0"
        got = model.infer(x[:1])  # a bare array, sent as .npy, for the model's only input
    np.testing.assert_allclose(next(iter(got.values())), want[:1], rtol=1e-4, atol=1e-4)


def test_bench_reports_load_first_inference_and_warm_latency(agents, mosquitto, make_bundle):
    agent = start_on_v1(agents, make_bundle, mosquitto, "bencher")
    result = edgefleet("bench", make_bundle("2.0.0"), "--device", "bencher", "--broker", mosquitto,
                       "--runs", 50, "--warmup", 5, "--json")
    assert result.returncode == 0, result.stderr
    r = json.loads(result.stdout)
    assert r["bundle"] == V2 and r["runs"] == 50 and r["runtime"] == "onnxruntime"
    assert r["load_ms"] > 0 and r["first_inference_ms"] > 0
    assert 0 < r["min_ms"] <= r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
    assert r["peak_rss_bytes"] >= r["rss_after_runs_bytes"] > 0
    assert status(agent)["active_bundle"] == V1  # benchmarking a bundle does not activate it

    table = edgefleet("bench", make_bundle("2.0.0"), "--device", "bencher", "--broker", mosquitto, "--runs", 20)
    assert table.returncode == 0 and "p99" in table.stdout and "first inference" in table.stdout
    # what was measured, on one line (a table's title wrapped at the table's width)
    assert "digits-cnn 2.0.0 on bencher (onnxruntime, 20 runs after 10 warm-up)\n" in table.stdout


@pytest.mark.parametrize("saved", [b"\x00\x01 torn write", b'{"state": "teleporting"}'])
def test_a_corrupt_or_unknown_saved_state_restores_the_last_committed_bundle(
        saved, agents, mosquitto, make_bundle, keys, tmp_path, expected_logits):
    from device_agent.bundle.signing import trusted_keys
    from device_agent.store import BundleStore

    # v1 committed; v2 unpacked and made current but never committed; then the record is garbage
    store = BundleStore(tmp_path / "devices" / "confused")
    trusted = trusted_keys([keys["pub"]])
    v1 = store.install(make_bundle("1.0.0"), trusted)
    store.activate(v1)
    store.commit(v1, keep=3)
    store.activate(store.install(make_bundle("2.0.0"), trusted))
    (store.root / "update.json").write_bytes(saved)

    agent = agents.start("confused")
    assert agent.wait_for_api(), agent.log.read_text()
    assert status(agent)["active_bundle"] == V1 and status(agent)["update_state"] == "idle"
    assert_answers_correctly(agent, expected_logits)


def test_the_shipped_client_example_runs_against_a_live_agent(agents, mosquitto, make_bundle):
    from tests.conftest import REPO

    agent = start_on_v1(agents, make_bundle, mosquitto, "example-pi")
    result = subprocess.run([sys.executable, str(REPO / "examples" / "local_inference.py"), "--socket",
                             agent.api_socket, "--count", "3"], capture_output=True, text=True, timeout=60,
                            cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert f"active model: {V1} on onnxruntime" in result.stdout
    assert result.stdout.count("logits: shape [1, 10]") == 3


def test_a_third_party_model_with_three_inputs_and_outputs_goes_through_the_whole_path(
        agents, mosquitto, keys, tmp_path):
    """A model the onnx package ships (not made here), its recorded inputs as the sample."""
    from host_tools.packaging import build_bundle
    from tests.device_agent.test_runtimes import shipped_case

    model, feeds, expected = shipped_case("pytorch-operator/test_operator_symbolic_override_nested")
    bundle = tmp_path / "nested.efb"
    build_bundle(model, name="nested", version="1.0.0", key=keys["key"], out=bundle, sample=feeds)
    agent = agents.start("third-party", inference_interval=0)
    assert agent.wait_for_api() and announced(mosquitto, "third-party")
    assert deploy(bundle, "third-party", mosquitto)["state"] == "active"
    with InferenceClient(agent.api_socket) as client:
        assert [i["name"] for i in client.describe()["inputs"]] == list(feeds)
        for fmt in ("raw", "npz", "json"):
            got = client.infer(feeds, format=fmt)
            assert len(got) == 3
            for have, want in zip(got.values(), expected):
                np.testing.assert_allclose(have, want, rtol=1e-5)


def test_a_model_with_its_weights_in_an_external_data_file_is_bundled_with_it_and_runs(
        agents, mosquitto, keys, tmp_path):
    """ONNX models over 2 GB must keep their weights in files beside the graph (external data). The
    bundle carries those files under the names the model reads them by, so the device loads it; the
    compression report counts them in the model's size."""
    import onnx

    from host_tools.compress import ModelFile
    from host_tools.packaging import build_bundle

    model = tmp_path / "split" / "transformer.onnx"
    model.parent.mkdir()
    onnx.save(onnx.load(str(MODELS / "digits_transformer.onnx")), str(model), save_as_external_data=True,
              location="transformer.weights", size_threshold=1024)
    assert (model.parent / "transformer.weights").stat().st_size > 5 * model.stat().st_size
    assert ModelFile.open(model).size_bytes == model.stat().st_size + (model.parent / "transformer.weights").stat().st_size
    bundle = tmp_path / "split.efb"
    manifest = build_bundle(model, name="split", version="1.0.0", key=keys["key"], out=bundle)
    assert "transformer.weights" in [f.path for f in manifest.files]
    agent = agents.start("split-pi", inference_interval=0)
    assert agent.wait_for_api() and announced(mosquitto, "split-pi")
    assert deploy(bundle, "split-pi", mosquitto)["state"] == "active"
    x = np.random.default_rng(0).random((1, 1, 8, 8), dtype=np.float32)
    with InferenceClient(agent.api_socket) as client:
        got = client.infer({"image": x})
    want = ModelFile.open(MODELS / "digits_transformer.onnx").load().run({"image": x})
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)


def test_the_agent_serves_the_local_api_over_http_when_asked(agents, mosquitto, make_bundle, expected_logits):
    import urllib.request

    port = free_port()
    agent = start_on_v1(agents, make_bundle, mosquitto, "http-pi", extra_args=("--http-port", str(port)))
    x, want = expected_logits
    body = json.dumps({"inputs": {"image": x.tolist()}}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/infer", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        got = json.loads(response.read())["outputs"]["logits"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert agent.proc.poll() is None


def test_commands_that_are_unsigned_forged_expired_or_tampered_are_refused_with_their_reason(
        agents, mosquitto, make_bundle, keys, expected_logits):
    agent = start_on_v1(agents, make_bundle, mosquitto, "guarded")
    assert deploy(make_bundle("2.0.0"), "guarded", mosquitto)["state"] == "active"
    events: dict[str, DeploymentEvent] = {}
    host = MqttClient(client_id="test-guarded", broker=mosquitto)
    host.subscribe(topics.events("guarded"), lambda t, p: events.setdefault(
        DeploymentEvent.from_payload(p).command_id, DeploymentEvent.from_payload(p)))
    host.connect()
    release, rogue = load_private_key(keys["key"]), load_private_key(keys["rogue_key"])
    rollback = lambda cid: RollbackCommand(cid, time.time()).to_payload()  # noqa: E731
    tampered = json.loads(sign_command(rollback("tampered"), release))
    tampered["issued_at"] += 1  # changed after signing
    cases = {
        "unsigned": (rollback("unsigned"), "command is not signed"),
        "rogue": (sign_command(rollback("rogue"), rogue), "does not trust"),
        "expired": (sign_command(rollback("expired"), release, expires_in=-5), "expired"),
        "tampered": (json.dumps(tampered).encode(), "does not match the command"),
    }
    try:
        for payload, _ in cases.values():
            host.publish(topics.command("guarded"), payload)
        assert wait_until(lambda: set(cases) <= set(events), 15), events
    finally:
        host.disconnect()
    for cid, (_, reason) in cases.items():
        assert events[cid].state == "failed" and reason in events[cid].reason, events[cid]
    assert status(agent)["active_bundle"] == V2  # nothing was rolled back
    assert status(agent)["committed"] == [V1, V2]
    assert_answers_correctly(agent, expected_logits)


def test_expired_older_and_foreign_bundles_are_refused_and_a_signed_downgrade_is_allowed(
        agents, mosquitto, make_bundle, keys, tmp_path, heldout, expected_logits):
    from host_tools.packaging import build_bundle

    def bundle(version, **policy):
        out = tmp_path / f"{version}-{len(policy)}.efb"
        build_bundle(MODELS / "digits_cnn.onnx", name="digits-cnn", version=version, key=keys["key"], out=out,
                     sample={"image": heldout[0][:1]}, **policy)
        return out

    agent = start_on_v1(agents, make_bundle, mosquitto, "policy")
    assert deploy(make_bundle("2.0.0"), "policy", mosquitto)["state"] == "active"

    expired = deploy(bundle("3.0.0", expires_at=time.time() - 60), "policy", mosquitto)
    assert expired["state"] == "failed" and "expired on" in expired["reason"]
    foreign = deploy(bundle("3.0.1", target={"arch": ["riscv64"]}), "policy", mosquitto)
    assert foreign["state"] == "failed" and "refused before download" in foreign["reason"]
    assert "riscv64" in foreign["reason"] and not list((agent.state_dir / "downloads").iterdir())
    older = deploy(make_bundle("1.0.0"), "policy", mosquitto)  # validly signed, but older: a rollback attack
    assert older["state"] == "failed" and "older than 2.0.0" in older["reason"]
    assert status(agent)["active_bundle"] == V2

    on_purpose = outcome(host_command("deploy", make_bundle("1.0.0"), "--device", "policy", "--broker", mosquitto,
                                      "--timeout", 60, "--chunk-size", 8192, "--allow-downgrade"), "policy")
    assert on_purpose["state"] == "active" and status(agent)["active_bundle"] == V1
    assert_answers_correctly(agent, expected_logits)
