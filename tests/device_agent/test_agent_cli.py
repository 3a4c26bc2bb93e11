"""`edgefleet-agent bench|status|rollback` on their own, as a user on a device types them."""

import json
import re
import subprocess
import sys
from dataclasses import asdict

from device_agent.protocol.reports import DeploymentEvent
from tests.conftest import MODELS


def agent_cli(*args):
    return subprocess.run([sys.executable, "-m", "device_agent", *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def test_bench_runs_a_verified_bundle_locally(make_bundle, keys):
    result = agent_cli("bench", make_bundle(), "--trusted-key", keys["pub"], "--runs", 30, "--warmup", 3, "--json")
    assert result.returncode == 0, result.stderr
    r = json.loads(result.stdout)
    assert r["runs"] == 30 and r["load_ms"] > 0 and 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
    table = agent_cli("bench", make_bundle(), "--trusted-key", keys["pub"], "--runs", 10)
    assert table.returncode == 0 and "first inference" in table.stdout and "peak RSS" in table.stdout
    assert re.search(r"^  p50 +\d+\.\d+ (µs|ms)$", table.stdout, re.M), table.stdout


def test_bench_timings_read_in_the_unit_that_suits_them():
    """benchmark_model speaks µs: a 15 µs model is not "0.015 ms" (two figures) here either."""
    from device_agent.bench import duration

    assert [duration(ms) for ms in (0.01524, 0.9996, 1.99141, 812.34)] == \
        ["15.2 µs", "999.6 µs", "1.991 ms", "812.3 ms"]


def test_bench_of_a_tflite_bundle(make_bundle, keys):
    bundle = make_bundle("1.0.0", name="digits-tflite", model=MODELS / "digits_cnn.tflite",
                         input_name="serving_default_args_0")
    result = agent_cli("bench", bundle, "--trusted-key", keys["pub"], "--runs", 20, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["runtime"] == "tflite"


def test_bench_refuses_a_bundle_signed_by_an_unknown_key_in_one_line(make_bundle, keys):
    result = agent_cli("bench", make_bundle(key=keys["rogue_key"]), "--trusted-key", keys["pub"])
    assert result.returncode == 1 and result.stderr.startswith("error:") and "does not trust" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_status_of_a_stopped_agent_reads_the_state_directory(tmp_path):
    (tmp_path / "state").mkdir()
    result = agent_cli("status", "--state-dir", tmp_path / "state", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    disk = doc.pop("disk")
    assert doc == {"running": False, "active_bundle": None, "sha256": None, "committed": [], "last_update": None}
    assert 0 < disk["free_bytes"] <= disk["total_bytes"]
    outcome = DeploymentEvent("pi-01", "c1", "failed", "digits-cnn 2.0.0", 0.0, "refused: expired", 1.7e9)
    (tmp_path / "state" / "last_update.json").write_bytes(outcome.to_payload())  # as the agent left it
    assert json.loads(agent_cli("status", "--state-dir", tmp_path / "state", "--json").stdout)["last_update"] == \
        asdict(outcome)
    shown = agent_cli("status", "--state-dir", tmp_path / "state").stdout
    assert re.search(r"last update: +failed digits-cnn 2.0.0: refused: expired \(2023-11-1\d .*, command c1\)", shown)


def test_rollback_without_a_running_agent_is_one_line(tmp_path):
    result = agent_cli("rollback", "--state-dir", tmp_path)
    assert result.returncode == 1 and "cannot reach the edgefleet agent" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_run_with_a_file_as_its_state_directory_is_one_line_and_leaves_the_file(tmp_path, keys):
    state = tmp_path / "state"
    state.write_text("my notes\n")
    result = agent_cli("run", "--device-id", "pi-01", "--state-dir", state, "--trusted-key", keys["pub"],
                       "--broker", "127.0.0.1:1")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: state_dir {state} is a file: give the folder the agent "
                                                  f"keeps its bundles in"]
    assert state.read_text() == "my notes\n"


def test_status_of_an_agent_that_cannot_reach_its_broker_says_why(tmp_path, keys):
    """On the device, `status` is where one looks when it does not show up on the host: it says
    the agent runs, is not connected, and why, for how long, after how many attempts."""
    from device_agent.mqtt import BrokerAddress
    from tests.conftest import AgentProcess, free_port, wait_until

    nowhere = BrokerAddress("127.0.0.1", free_port())  # nothing listens there
    agent = AgentProcess("pi-offline", tmp_path / "state", nowhere, keys["pub"])
    try:
        assert agent.wait_for_api(), agent.log.read_text()

        def status() -> str:
            result = agent_cli("status", "--state-dir", tmp_path / "state", "--control-socket", agent.control_socket)
            assert result.returncode == 0, result.stderr
            return result.stdout
        assert wait_until(lambda: "Connection refused" in status(), 15, 0.2), status()
        lines = status().splitlines()
        assert lines[0] == "agent:         running"
        assert lines[1].startswith("broker:        not connected: [Errno 111] Connection refused (for "), lines
        assert lines[1].endswith(" attempt)") or lines[1].endswith(" attempts)"), lines
        doc = json.loads(agent_cli("status", "--state-dir", tmp_path / "state", "--control-socket",
                                   agent.control_socket, "--json").stdout)
        assert doc["connected"] is False and doc["broker_problem"]["attempts"] >= 1
    finally:
        agent.terminate()
        agent.cleanup()  # (its socket directory under /tmp)
