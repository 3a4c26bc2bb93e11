"""`edgefleet compress --device`: latency measured by a real agent, where the model will run."""

import json
import re

from tests.conftest import MODELS, announced, edgefleet


def test_compress_times_every_model_on_the_device_and_activates_nothing(agents, mosquitto, keys, tmp_path):
    agent = agents.start("bench-pi")
    assert agent.wait_for_api() and announced(mosquitto, "bench-pi")
    out = tmp_path / "digits.int8.onnx"
    result = edgefleet("compress", MODELS / "digits_cnn.onnx", "--recipe", "int8-static",
                       "--calib", MODELS / "digits_calib.npz", "--eval", MODELS / "digits_heldout.npz", "-o", out,
                       "--device", "bench-pi", "--broker", mosquitto, "--key", keys["key"], "--latency-runs", 20,
                       "--json", timeout=300)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert "device bench-pi (the agent's benchmark command, the median of 3 interleaved rounds" in doc["latency_method"]
    for row in [doc["original"], *doc["steps"]]:  # 20 runs asked: 7 in each of 3 rounds
        assert row["latency"]["runs"] == 21 and row["latency"]["p50_ms"] > 0
    rounds = re.findall(r"timing (\S+) on bench-pi \(round (\d)/3, 7 runs\)", result.stderr)
    files = [doc["original"]["file"], *(row["file"] for row in doc["steps"])]
    assert sorted(rounds) == sorted((f, str(r)) for f in files for r in (1, 2, 3))
    assert rounds[0][0] == files[0] and rounds[len(files)][0] == files[1]  # each round starts one further on
    status = json.loads(edgefleet("device", "status", "bench-pi", "--broker", mosquitto, "--json").stdout)
    assert status.get("active_bundle") in (None, "")  # benchmarking installs nothing


def test_compress_on_a_device_that_does_not_answer_is_one_line(mosquitto, keys, tmp_path):
    result = edgefleet("compress", MODELS / "digits_cnn.onnx", "--recipe", "int8-dynamic",
                       "--eval", MODELS / "digits_heldout.npz", "-o", tmp_path / "x.onnx", "--device", "nobody",
                       "--broker", mosquitto, "--key", keys["key"], "--latency-runs", 10, "--device-timeout", 3)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: nobody has never connected to this broker: not installed yet, or a wrong device id? (the broker "
        "keeps commands only for devices it has seen)")
    assert "evaluating" not in result.stderr  # asked before compressing anything
    assert not (tmp_path / "x.onnx").exists()


def test_an_original_whose_rounds_on_the_device_differ_much_says_the_ratios_are_that_uncertain():
    """A Pi that throttles, or gets busy, while the series runs: the report's latency line says how
    far apart the original's rounds were, instead of ratios that look exact."""
    from host_tools.compress.device import drifted

    assert drifted([0.0202, 0.0375, 0.0301]) == (
        "; the original's ranged from 20.2 µs to 37.5 µs, 1.86x apart: the device's speed changed during the "
        "series, and the ratios are that uncertain")
    assert drifted([2.5, 1.25, 2.0]).startswith("; the original's ranged from 1.250 ms to 2.500 ms, 2.00x apart")
    assert drifted([1.0, 1.15, 1.1]) == ""  # within 20%: the median stands on its own
