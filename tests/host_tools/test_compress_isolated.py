"""A library that dies in a pass, or on a pass's output, takes only that step with it, not the
compress command.

The crash is a real one: ONNX Runtime 1.32's NCHWc layout transformer dies (SIGSEGV) creating a CPU
session for the CRNN fixture's float16 graph. The float16 pass looks for that itself, in a child
process; the tests make that graph with its look turned off, as for any crash nobody foresaw, and
hand it to a pass (passes_for_tests) that hands it back as its output, or loads it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime
import psutil
import pytest

from device_agent.errors import ModelError
from host_tools.compress import Dataset, ModelFile, run_recipe
from host_tools.compress.auto import Candidate, search
from host_tools.compress.data import load_dataset
from host_tools.compress.evaluate import bind, outputs_on
from host_tools.compress.isolated import RuntimeCrash, Sandbox
from host_tools.compress.onnx import fp16
from host_tools.compress.passes import REGISTRY, showing_progress
from host_tools.compress.recipes import Recipe, Step
from host_tools.compress.workflow import apply_pass
from tests.conftest import FIXTURES, MODELS
from tests.host_tools.passes_for_tests import HandsBack, LoadsInOrt

CRASH = "ONNX Runtime crashed running it (SIGSEGV, signal 11)"

pytestmark = pytest.mark.skipif(onnxruntime.__version__ != "1.32.0",
                                reason="the float16 CRNN crashes ONNX Runtime 1.32 (compact.py); others may not")


def recipe(*steps: tuple[str, dict]) -> Recipe:
    return Recipe("test", tuple(Step(name, dict(options)) for name, options in steps))


@pytest.fixture
def crnn(monkeypatch, tmp_path) -> tuple[ModelFile, Dataset, str]:
    """The CRNN fixture, 8 text-line images for it, and its float16 graph that ORT dies on (written
    with the float16 pass's own check off, never loaded here); the test passes registered."""
    for cls in (HandsBack, LoadsInOrt):
        monkeypatch.setitem(REGISTRY, cls.name, cls)
    model = ModelFile.open(FIXTURES / "crnn_ocr.onnx")
    with monkeypatch.context() as patched:
        patched.setattr(fp16, "session_crash", lambda path: None)
        (tmp_path / "fp16").mkdir()
        crashing = fp16.OnnxFp16().run(model, fp16.OnnxFp16.Config(), tmp_path / "fp16")
    name = model.load().inputs[0].name
    lines = Dataset({name: np.random.default_rng(0).random((8, 1, 32, 48), np.float32)}, None, "lines")
    return model, lines, str(crashing.path)


def test_a_result_the_runtime_dies_on_fails_its_step_and_the_recipe_goes_on(crnn, tmp_path):
    model, data, crashing = crnn
    report = run_recipe(model, recipe(("test-hands-back", {"path": crashing}), ("onnx-dynamic", {})),
                        eval_data=data, latency_runs=3, workdir=tmp_path)
    crashed, dynamic = report.steps
    assert crashed.status == "failed" and crashed.note == f"{CRASH} on the evaluation data", crashed.note
    assert crashed.latency is None and crashed.outputs is None
    # the next pass took the original, as after any failed step, and was measured and timed
    assert dynamic.status == "ok" and dynamic.fidelity.cosine > 0.99 and dynamic.latency is not None
    assert report.result is dynamic and report.to_dict()["steps"][0]["note"] == crashed.note


def test_without_evaluation_data_the_run_on_zeros_is_isolated_too(crnn, tmp_path):
    model, _, crashing = crnn
    report = run_recipe(model, recipe(("test-hands-back", {"path": crashing}), ("onnx-dynamic", {})),
                        latency_runs=3, workdir=tmp_path)
    assert [s.status for s in report.steps] == ["failed", "ok"]
    assert report.steps[0].note == f"does not run: {CRASH}"


def test_a_pass_a_library_dies_in_fails_its_step_and_its_progress_was_shown(crnn, tmp_path):
    """A pass runs in the child too: ORT dying inside it (as it could calibrating, or probing
    sensitivity) fails that step; what the pass said before is shown as it ran."""
    model, data, crashing = crnn
    said = []
    with showing_progress(said.append):
        report = run_recipe(model, recipe(("test-loads-in-ort", {"path": crashing}), ("onnx-dynamic", {})),
                            eval_data=data, latency_runs=3, workdir=tmp_path, progress=said.append)
    crashed, dynamic = report.steps
    assert crashed.status == "failed" and dynamic.status == "ok"
    assert crashed.note == "the pass crashed (SIGSEGV, signal 11): a library it runs died on the model"
    assert f"loading {Path(crashing).name}" in said


def test_auto_goes_on_past_a_candidate_the_runtime_dies_on(crnn, tmp_path):
    model, data, crashing = crnn
    candidates = (Candidate("fp16", (Step("test-hands-back", {"path": crashing}),)),
                  Candidate("dynamic", (Step("onnx-dynamic", {}),)))
    report = search(model, eval_data=data, max_drop=5.0, candidates=candidates, latency_runs=3,
                    goal="size", out=tmp_path / "out.onnx")
    assert report.chosen is not None and report.chosen.label == "dynamic"
    assert report.auto.verdicts["fp16"].startswith("failed") and CRASH in report.auto.verdicts["fp16"], \
        report.auto.verdicts


def test_a_pass_or_config_the_child_cannot_import_runs_here(crnn, tmp_path):
    model, _, _ = crnn

    class Local(HandsBack):  # (inside a function: not importable by its name)
        pass

    class LocalConfig(HandsBack.Config):  # (a config the child cannot unpickle: likewise)
        pass

    with Sandbox(None) as sandbox:
        step = apply_pass(Local, Local.Config(str(model.path)), model, tmp_path, sandbox)
        assert step.status == "ok" and sandbox._child is None  # (never asked)
        step = apply_pass(HandsBack, LocalConfig(str(model.path)), model, tmp_path, sandbox)
        assert step.status == "ok"  # (not sent: pickling it failed here, before anything went to the child)


def test_one_child_serves_every_model_and_a_new_one_follows_a_crash(crnn):
    """The sandbox gives the same outputs as running in this process; a model the runtime
    refuses is a ModelError, as in this process; after a crash the next model runs."""
    model, _, crashing = crnn
    crashing = ModelFile.open(crashing)
    digits = ModelFile.open(MODELS / "digits_cnn.onnx")
    heldout = bind(load_dataset(MODELS / "digits_heldout.npz"), digits.load())
    with Sandbox(heldout) as sandbox:
        expected = outputs_on(digits.load(), heldout)
        first = sandbox.outputs(digits)
        child = sandbox._child.process.pid
        assert all(np.array_equal(first[k], expected[k]) for k in expected)
        with pytest.raises(ModelError):
            sandbox.outputs(model)  # (the CRNN does not take 8x8 digits)
        assert sandbox._child.process.pid == child
        with pytest.raises(RuntimeCrash, match="SIGSEGV"):
            sandbox.outputs(crashing)
        assert not psutil.pid_exists(child)
        again = sandbox.outputs(digits)
        child = sandbox._child.process.pid
        assert all(np.array_equal(again[k], expected[k]) for k in expected)
    # the next command's sandbox takes the same child, which forgot the last one's data
    with Sandbox(None) as sandbox:
        assert sandbox.runs_on_zeros(digits) is None and sandbox._child.process.pid == child
        with pytest.raises(RuntimeError, match="outputs_on"):
            sandbox.outputs(digits)  # (no data to run it on: our fault, with the child's traceback)
    ours = [c.pid for c in psutil.Process().children() if "isolated import serve" in " ".join(c.cmdline())]
    assert ours == [child]  # (one idle child, no more)


def test_an_original_that_kills_the_runtime_as_it_loads_is_one_line_and_exit_1(crnn, tmp_path):
    """Handed such a model to compress (a float16 graph ORT 1.32's optimizer dies on), the command had
    died with "Segmentation fault". It is loaded in the child first, and refused in one line."""
    from tests.conftest import edgefleet

    _, _, crashing = crnn
    np.savez(tmp_path / "lines.npz", line=np.random.default_rng(0).random((4, 1, 32, 48), np.float32))
    for extra in ([], ["--eval", tmp_path / "lines.npz"]):
        done = edgefleet("compress", crashing, "--recipe", "int8-dynamic", "-o", tmp_path / "out.onnx", *extra)
        assert done.returncode == 1, done.stderr
        assert done.stderr.strip().splitlines()[-1] == (
            f"error: {Path(crashing).name}: ONNX Runtime crashed loading it (SIGSEGV, signal 11); there is nothing "
            f"to compress it against"), done.stderr
        assert "Traceback" not in done.stderr and not (tmp_path / "out.onnx").exists()


def slow_model(path: Path, side: int = 384, layers: int = 200) -> ModelFile:
    """[N, side, side] through *layers* MatMuls with one weight and Tanh: a quarter of a second a sample
    or more (the fastest machine here: 8 samples in 2 s)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array((np.eye(side) * 0.9).astype(np.float32), "w")
    nodes, last = [], "x"
    for i in range(layers):
        nodes += [helper.make_node("MatMul", [last, "w"], [f"m{i}"]), helper.make_node("Tanh", [f"m{i}"], [f"t{i}"])]
        last = f"t{i}"
    graph = helper.make_graph(nodes, "slow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", side, side])],
                              [helper.make_tensor_value_info(last, TensorProto.FLOAT, ["n", side, side])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return ModelFile.open(path)


def test_an_original_the_runtime_dies_on_while_it_runs_the_data_is_one_line(tmp_path):
    """The original runs on the evaluation data in the child too: the runtime dying there (here the
    child is sent SIGSEGV while it runs, 0.3 s into seconds of work) is one line, where it had taken
    the command down."""
    import os
    import signal
    import threading

    from device_agent.errors import ConfigError

    model = slow_model(tmp_path / "slow.onnx")
    data = Dataset({"x": np.random.default_rng(0).random((8, 384, 384), np.float32)}, None, "frames")

    def kill_the_child_as_it_runs(line: str) -> None:
        if line.startswith("evaluating the original"):
            (child,) = [c.pid for c in psutil.Process().children()
                        if c.status() != psutil.STATUS_ZOMBIE and "isolated import serve" in " ".join(c.cmdline())]
            threading.Timer(0.3, os.kill, (child, signal.SIGSEGV)).start()

    with pytest.raises(ConfigError) as raised:
        run_recipe(model, recipe(("onnx-dynamic", {})), eval_data=data, latency_runs=3, workdir=tmp_path,
                   progress=kill_the_child_as_it_runs)
    assert str(raised.value) == f"slow.onnx: {CRASH} on the evaluation data; there is nothing to compress it against"
