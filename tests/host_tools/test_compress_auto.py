"""--auto: a ladder of candidates, each measured; the best within the tolerance, or plainly none."""

import numpy as np
import pytest

from host_tools.compress import ModelFile, Step
from host_tools.compress.auto import ONNX_LADDER, SPEED_MARGIN, Candidate, ladder, search
from tests.conftest import FIXTURES, MODELS

HELDOUT, CALIB = MODELS / "digits_heldout.npz", MODELS / "digits_calib.npz"
# Percentile calibration at the 10th percentile clips most activations: a candidate that loses.
CLIPPED = Candidate("clipped static int8", (Step("onnx-static", {"method": "percentile", "percentile": 10}),),
                    needs_calibration=True)
PLAIN = Candidate("static int8", (Step("onnx-static"),), needs_calibration=True)


@pytest.fixture(scope="module")
def digits():
    return ModelFile.open(MODELS / "digits_cnn.onnx")


def test_auto_keeps_the_smallest_within_the_tolerance_and_says_why_for_every_candidate(digits, tmp_path):
    out = tmp_path / "auto.onnx"
    report = search(digits, eval_data=HELDOUT, calib=CALIB, train=MODELS / "digits_train.npz", max_drop=1.0,
                    out=out, latency_runs=20)
    auto, chosen = report.auto, report.chosen
    assert chosen is not None and out.is_file() and report.result.model.path == out
    assert chosen.fidelity.accuracy >= report.original.fidelity.accuracy - 0.01
    assert chosen.size_bytes < 0.35 * report.original.size_bytes
    measured = [m for m in report.steps if m.status == "ok"]
    assert all(m.size_bytes >= chosen.size_bytes * 0.95 or m.latency is None for m in measured)
    assert set(auto.verdicts) == {c.name for c in ONNX_LADDER}  # every candidate has a verdict
    assert auto.verdicts[chosen.label].startswith("chosen")
    # plain static int8 was within tolerance, so the costlier fall-backs were not tried
    assert auto.verdicts["static int8, 1 sensitive node in float"].startswith("not tried")
    assert "no MatMul" in auto.verdicts["int4 MatMul weights"]
    assert auto.failures() == {}  # (a candidate that raised would show only among the verdicts)
    doc = report.to_dict()
    assert doc["auto"]["chosen"] == chosen.label
    ladder_steps = next(c.steps for c in ladder(digits) if c.name == chosen.label)
    assert doc["recipe"]["passes"] == [s.to_dict() for s in ladder_steps]  # reproducible as a recipe file


def test_auto_says_plainly_when_nothing_is_within_the_tolerance(digits, tmp_path):
    out = tmp_path / "none.onnx"
    report = search(digits, eval_data=HELDOUT, calib=CALIB, max_drop=1.0, candidates=(CLIPPED,), out=out,
                    latency_runs=10)
    assert report.chosen is None and not report.compressed and not out.exists()
    assert "none of 1 candidates stays within 1 points" in report.auto.why_none
    assert report.auto.verdicts["clipped static int8"].startswith("loses")


def test_auto_says_when_no_candidate_applies_to_the_model_at_all(tmp_path):
    """A model whose parameters are attributes of an ai.onnx.ml op (a LogisticRegression as skl2onnx
    writes it; a forest's trees likewise) has nothing any candidate compresses: --auto says that,
    with the first candidate's reason, not that none stayed within the tolerance."""
    from host_tools.compress import Dataset
    from tests.host_tools import graphs

    model = ModelFile.open(graphs.linear_classifier(tmp_path / "linear.onnx"))
    x = np.random.default_rng(0).random((64, 8)).astype(np.float32)
    data = Dataset({"x": x}, model.load().run({"x": x})["label"], "tabular")
    report = search(model, eval_data=data, calib=data, max_drop=1.0, latency_runs=10, out=tmp_path / "out.onnx")
    assert report.chosen is None and not (tmp_path / "out.onnx").exists()
    assert report.auto.why_none.startswith(f"none of {len(ladder(model))} candidates applies to this model; the "
                                           "first says: "), report.auto.why_none
    assert report.original.fidelity.accuracy == 1.0  # (scored from its probabilities, its second output)


def test_auto_for_speed_never_hands_back_a_slower_model(digits, tmp_path):
    report = search(digits, eval_data=HELDOUT, calib=CALIB, max_drop=1.0, goal="speed",
                    candidates=(PLAIN, CLIPPED), latency_runs=40)
    if report.chosen is None:
        assert "none is faster" in report.auto.why_none
        # slower in the shared timing rounds, or faster there (timing noise) and not in its own rounds
        verdict = report.auto.verdicts["static int8"]
        assert "not faster" in verdict or "not in a second" in verdict, verdict
    else:  # on a CPU where int8 wins (VNNI, dot-product instructions)
        assert report.chosen.latency.p50_ms <= SPEED_MARGIN * report.original.latency.p50_ms
    assert report.auto.verdicts["clipped static int8"].startswith("loses")


def test_a_speed_up_that_a_second_timing_does_not_show_is_not_chosen(digits, monkeypatch):
    """On a shared machine one timing of a 30 µs model can show a 10% speed-up that is not there (a
    TFLite run of the benchmark had --auto --goal speed hand back a model it then timed 1.13x
    slower). Timing noise cannot be made on demand, so the timings here are scripted: the faster
    candidate of the first rounds is no faster in rounds of its own, the runner-up is."""
    from host_tools.compress import evaluate

    fp16, dynamic = Candidate("fp16", (Step("onnx-fp16"),)), Candidate("dynamic", (Step("onnx-dynamic"),))
    p50 = iter([[1.0, 0.80, 0.90],  # the original, fp16, dynamic: fp16 looks fastest
                [1.0, 1.02],  # fp16 against the original again: not faster
                [1.0, 0.91]])  # dynamic again: faster
    asked = []

    def scripted(models, data, **_):
        asked.append([m.path.name for m in models])
        return [evaluate.Latency(ms, ms, 10) for ms in next(p50)]

    monkeypatch.setattr(evaluate, "latencies", scripted)
    report = search(digits, eval_data=HELDOUT, max_drop=1.0, goal="speed", candidates=(fp16, dynamic), latency_runs=10)
    assert report.chosen is not None and report.chosen.label == "dynamic"
    assert report.auto.verdicts["fp16"] == "faster in one timing (0.80x p50), not in a second (1.02x): not chosen"
    assert [len(a) for a in asked] == [3, 2, 2] and asked[1][0] == asked[2][0] == "digits_cnn.onnx"
    assert report.original.latency.p50_ms == 1.0 and report.chosen.latency.p50_ms == 0.90  # the report's timing


def test_auto_without_calibration_tries_only_what_needs_none(digits):
    report = search(digits, eval_data=HELDOUT, max_drop=1.0, latency_runs=10)
    tried = {m.label for m in report.steps}
    assert "dynamic int8" in tried and not any(name.startswith("static") for name in tried)


@pytest.mark.parametrize("model, eval_data, eight_bit, max_drop", [
    # the reference CNN, per-channel static int8: 97.50% here, 98.06% with 7-bit weights
    ("digits_cnn.onnx", HELDOUT, "static int8 per-channel", 0.0),
    # the transformer, dynamic int8 without labels: top-1 agreement 358/360 here, 360/360 with 7-bit weights
    ("digits_transformer.onnx", "unlabelled", "dynamic int8", 0.3),
])
def test_seven_bit_weights_are_tried_when_the_8_bit_form_loses(model, eval_data, eight_bit, max_drop, tmp_path):
    """ONNX Runtime's u8 x s8 kernels saturate on x86 CPUs without VNNI (this project's AVX2 machine);
    7-bit weights do not, and --auto tries them when the 8-bit form loses too much."""
    if eval_data == "unlabelled":
        eval_data = tmp_path / "inputs.npz"
        np.savez(eval_data, x=np.load(HELDOUT)["x"])
    seven_bit = f"{eight_bit}, 7-bit weights"
    candidates = tuple(c for c in ONNX_LADDER if c.name in (eight_bit, seven_bit))
    report = search(ModelFile.open(MODELS / model), eval_data=eval_data, calib=CALIB, max_drop=max_drop,
                    candidates=candidates, latency_runs=10)
    verdicts = report.auto.verdicts
    if verdicts[eight_bit].startswith("loses"):
        assert report.chosen is not None and report.chosen.label == seven_bit, verdicts
    else:  # a CPU whose int8 kernels do not saturate (VNNI, ARM): the 8-bit form was enough
        assert report.chosen.label == eight_bit and verdicts[seven_bit].startswith("not tried"), verdicts


def test_every_static_int8_combination_falls_back_to_7_bit_weights_on_the_same_pruned_model():
    """Pruned or sparse models saturate the same kernels (the small ResNet: 50% channels + static int8
    loses 23 points with 8-bit weights, 0.28 with 7-bit, docs/benchmarks.md). The 7-bit form reuses
    the 8-bit candidate's passes before quantizing, which --auto runs once for both."""
    by_name = {c.name: c for c in ONNX_LADDER}
    combos = [c for c in ONNX_LADDER if c.steps[-1].pass_name == "onnx-static" and len(c.steps) > 2
              and "reduce_range" not in c.steps[-1].options]
    assert {c.name for c in combos} == {"50% sparse, static int8", "80% sparse, static int8",
                                        "50% channels pruned, recovered, static int8"}
    for combo in combos:
        seven = by_name[f"{combo.name}, 7-bit weights"]
        assert seven.if_missed == combo.name and seven.steps[:-1] == combo.steps[:-1]
        assert seven.steps[-1].options == {**combo.steps[-1].options, "reduce_range": True}


def test_a_candidate_whose_last_pass_does_not_apply_is_what_the_passes_before_it_made(digits):
    """Dynamic int8 ends with onnx-int8-params, which finds nothing left in float in a CNN: the
    candidate is the dynamic int8 model, as a recipe would hand it on; int4, whose only compressing
    pass does not apply to a CNN, is skipped."""
    dynamic, int4 = (next(c for c in ONNX_LADDER if c.name == name) for name in ("dynamic int8", "int4 MatMul weights"))
    report = search(digits, eval_data=HELDOUT, max_drop=1.0, candidates=(dynamic, int4), latency_runs=10)
    assert report.chosen is not None and report.chosen.label == "dynamic int8", report.auto.verdicts
    assert report.chosen.size_bytes < 0.35 * report.original.size_bytes
    assert "no MatMul" in report.auto.verdicts["int4 MatMul weights"]


def test_a_candidate_whose_named_pass_does_not_apply_is_not_chosen_under_its_name():
    """Nothing of a Keras LSTM can be channel-pruned (its layers feed a WHILE loop). "50% channels
    pruned, recovered, dynamic-range int8" had been chosen there under that name although only its
    dynamic-range int8 had applied; it is skipped with the reason, and what is chosen is named for
    what was done."""
    from host_tools.compress import Dataset
    from host_tools.compress.auto import TFLITE_LADDER

    model = ModelFile.open(FIXTURES / "keras_lstm.tflite")
    ids = np.random.default_rng(0).integers(0, 200, (16, 20)).astype(np.int32)
    data = Dataset({model.load().inputs[0].name: ids}, None, "ids")
    pruned, dynamic = (next(c for c in TFLITE_LADDER if c.name == name)
                       for name in ("50% channels pruned, recovered, dynamic-range int8", "dynamic-range int8"))
    report = search(model, calib=data, eval_data=data, max_drop=1.0, candidates=(pruned, dynamic), latency_runs=10)
    assert report.chosen is not None and report.chosen.label == "dynamic-range int8", report.auto.verdicts
    assert report.auto.verdicts[pruned.name].startswith("skipped") and \
        "no layer whose channels can be removed" in report.auto.verdicts[pruned.name]


def test_candidates_skipped_for_one_reason_share_its_line():
    """--auto's list of verdicts: every sparsity level of a model with no layer to sparsify is one
    line, not four saying the same; other verdicts keep a line each, in order."""
    from host_tools.compress.report import verdict_lines

    none = "skipped: m.onnx has no Conv/Gemm/MatMul weight of at least 1024 elements"
    verdicts = {"dynamic int8": "chosen: 0.28x size", "50% sparse": none, "fp16": "within tolerance (0.51x size)",
                "80% sparse": none, "25% channels": "skipped: no layer whose channels can be removed safely",
                "7-bit": "not tried: dynamic int8 did not miss the tolerance",
                "8-bit": "not tried: dynamic int8 did not miss the tolerance"}
    assert verdict_lines(verdicts) == [
        "dynamic int8: chosen: 0.28x size", f"50% sparse; 80% sparse: {none}", "fp16: within tolerance (0.51x size)",
        "25% channels: skipped: no layer whose channels can be removed safely",
        "7-bit: not tried: dynamic int8 did not miss the tolerance",
        "8-bit: not tried: dynamic int8 did not miss the tolerance"]
