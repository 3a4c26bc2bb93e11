"""Staged rollouts with real agents, a real broker, the monitor's registry and the CLI."""

from __future__ import annotations

import json

from host_tools.fleet.store import FleetStore
from tests.conftest import edgefleet, wait_until

FLEET = [f"ro-{i}" for i in range(5)]


def start_fleet(agents, monitor, group="canary-fleet"):
    procs = {d: agents.start(d, telemetry_interval=0.5, extra_args=("--label", f"group={group}")) for d in FLEET}
    store = FleetStore(monitor)
    assert wait_until(lambda: {r.device_id for r in store.devices() if r.online} >= set(FLEET), 30)
    return procs


def rollout(monitor, mosquitto, bundle, *extra):
    result = edgefleet("rollout", "start", bundle, "--group", "canary-fleet", "--db", monitor, "--broker", mosquitto,
                       "--stages", "20,60,100", "--window", "0", "--stage-timeout", "60", "--json", *extra,
                       timeout=300)
    return result.returncode, json.loads(result.stdout), result.stderr


def test_a_staged_rollout_reaches_every_device_stage_by_stage(agents, monitor, mosquitto, make_bundle):
    start_fleet(agents, monitor)
    code, doc, log = rollout(monitor, mosquitto, make_bundle("1.0.0"))
    assert code == 0 and doc["state"] == "done", log
    stages = {d["device_id"]: d["stage"] for d in doc["devices"]}
    assert sorted(stages.values()) == [0, 1, 1, 2, 2]  # 20% of 5 = 1, then up to 60% = 3, then all
    assert {d["state"] for d in doc["devices"]} == {"active"}
    assert "stage 1/3 (20%): 1 device(s)" in log and "stage 3/3 (100%): 2 device(s)" in log
    status = edgefleet("rollout", "status", doc["rollout_id"], "--db", monitor)
    assert status.returncode == 0 and "5 active" in status.stdout
    store = FleetStore(monitor)
    assert wait_until(lambda: all(r.active_bundle == "digits-cnn 1.0.0" for r in store.devices()
                                  if r.device_id in FLEET), 10)


def test_a_failing_canary_halts_the_rollout_and_is_rolled_back(agents, monitor, mosquitto, make_bundle, forge_bundle):
    start_fleet(agents, monitor)
    code, doc, _ = rollout(monitor, mosquitto, make_bundle("1.0.0"))
    assert code == 0
    broken = forge_bundle("2.0.0", output_offset=5.0)  # signed, but its outputs are wrong: the health check fails
    code, doc, log = rollout(monitor, mosquitto, broken, "--rollback-on-halt")
    assert code == 1 and doc["state"] == "halted" and "failed" in doc["reason"], log
    (canary,) = [d for d in doc["devices"] if d["stage"] == 0]
    assert canary["state"] == "failed" and len(doc["devices"]) == 1  # nobody past the canary was sent it
    store = FleetStore(monitor)
    assert all(r.active_bundle == "digits-cnn 1.0.0" for r in store.devices() if r.device_id in FLEET)


def test_rollout_commands_refuse_bad_input_in_one_line(monitor, mosquitto, make_bundle, tmp_path):
    for args, message in [(("start", make_bundle("1.0.0"), "--db", monitor), "say which devices"),
                          (("start", tmp_path / "nope.efb", "--group", "g", "--db", monitor), "does not exist"),
                          (("start", make_bundle("1.0.0"), "--group", "g", "--stages", "50,20", "--db", monitor),
                           "increasing percentages"),
                          (("status", "no-such-rollout", "--db", monitor), "no rollout")]:
        result = edgefleet("rollout", *args, "--broker", mosquitto) if args[0] == "start" else \
            edgefleet("rollout", *args)
        assert result.returncode in (1, 2) and message in result.stderr and "Traceback" not in result.stderr, \
            (args, result.stderr)


def slow_twin(reference_model, out):
    """The reference model plus a chain of large MatMuls on its input, multiplied by zero and added
    to the logits: the same outputs (so it passes the health check), tens of times slower. (The
    chain starts from the input so the runtime cannot fold it away as a constant.)"""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(reference_model)
    graph = model.graph
    image, logits = graph.input[0].name, graph.output[0].name
    for node in graph.node:
        node.output[:] = ["fast_logits" if o == logits else o for o in node.output]
    rng = np.random.default_rng(0)
    graph.initializer.extend([numpy_helper.from_array(rng.standard_normal((64, 1024)).astype(np.float32), "slow_in"),
                              numpy_helper.from_array(rng.standard_normal((1024, 1024)).astype(np.float32) / 32,
                                                      "slow_w"),
                              numpy_helper.from_array(np.zeros((1,), np.float32), "zero")])
    graph.node.extend([helper.make_node("Flatten", [image], ["slow_flat"]),
                       helper.make_node("MatMul", ["slow_flat", "slow_in"], ["slow_0"])])
    for i in range(1, 97):  # ~100M multiply-adds: ~5 ms a call (the reference: ~0.03 ms)
        graph.node.append(helper.make_node("MatMul", [f"slow_{i - 1}", "slow_w"], [f"slow_{i}"]))
    graph.node.extend([helper.make_node("ReduceSum", ["slow_96"], ["slow_sum"], keepdims=0),
                       helper.make_node("Mul", ["slow_sum", "zero"], ["slow_zero"]),
                       helper.make_node("Add", ["fast_logits", "slow_zero"], [logits])])
    onnx.save(model, out)
    return out


def test_a_canary_that_is_much_slower_halts_the_rollout_and_is_rolled_back(agents, monitor, mosquitto, make_bundle,
                                                                            reference_model, tmp_path):
    start_fleet(agents, monitor)
    assert rollout(monitor, mosquitto, make_bundle("1.0.0"))[0] == 0
    store = FleetStore(monitor)
    # the previous version's latency, in steady state, is what the canary is compared with
    assert wait_until(lambda: all(store.telemetry_count(d, "digits-cnn 1.0.0") >= 12 for d in FLEET), 30)
    slow = make_bundle("2.0.0", model=slow_twin(reference_model, tmp_path / "slow.onnx"))
    code, doc, log = rollout(monitor, mosquitto, slow, "--rollback-on-halt", "--window", "5")
    assert code == 1 and doc["state"] == "halted" and "p99 latency is" in doc["reason"], (doc, log)
    (canary,) = [d for d in doc["devices"] if d["stage"] == 0]
    assert canary["state"] == "rolled_back" and len(doc["devices"]) == 1  # healthy outcome, slow model: stopped
    assert wait_until(lambda: all(r.active_bundle == "digits-cnn 1.0.0" for r in store.devices()
                                  if r.device_id in FLEET), 20)


def test_a_halts_reason_says_each_fault_once_with_the_devices_it_hit():
    from host_tools.rollout import _by_reason

    failed = ([{"device_id": f"d-{i}", "reason": "health check failed: output differs"} for i in range(6)]
              + [{"device_id": "e-1", "reason": "no space left"}, {"device_id": "e-2", "reason": None}]
              + [{"device_id": f"f-{i}", "reason": f"odd {i}"} for i in range(2)])
    assert _by_reason(failed) == ("health check failed: output differs (d-0, d-1, d-2 and 3 more); "
                                  "no space left (e-1); no reason given (e-2); 2 more for other reasons")
