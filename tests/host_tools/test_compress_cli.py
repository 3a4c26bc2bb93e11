"""`edgefleet compress` as a user runs it: recipes, --auto, the guard, the report into a bundle."""

import json

from tests.conftest import MODELS, edgefleet

MODEL, HELDOUT, CALIB = MODELS / "digits_cnn.onnx", MODELS / "digits_heldout.npz", MODELS / "digits_calib.npz"


def last_line(result) -> str:
    return [line for line in result.stderr.splitlines() if line.strip()][-1]


def test_compress_writes_the_model_and_a_report_that_a_bundle_carries(tmp_path, keys):
    out, report = tmp_path / "digits.int8.onnx", tmp_path / "report.json"
    result = edgefleet("compress", MODEL, "--recipe", "int8-static", "--calib", CALIB, "--eval", HELDOUT,
                       "-o", out, "--report", report, "--latency-runs", 20)
    assert result.returncode == 0, result.stderr
    assert out.is_file() and "onnx-static" in result.stdout and "p50 µs" in result.stdout
    doc = json.loads(report.read_text())
    assert doc["recipe"]["name"] == "int8-static" and doc["result"]["file"] == out.name
    bundle = tmp_path / "d.efb"
    built = edgefleet("bundle", "build", out, "--name", "digits-cnn", "--version", "1.1.0", "--key", keys["key"],
                      "-o", bundle, "--compression-report", report)
    assert built.returncode == 0, built.stderr
    manifest = json.loads(edgefleet("bundle", "inspect", bundle, "--json").stdout)
    assert manifest["compression"]["recipe"]["name"] == "int8-static"
    shown = edgefleet("bundle", "inspect", bundle).stdout
    accuracy = manifest["compression"]["steps"][-1]["fidelity"]["accuracy"]
    assert "compression: int8-static ->" in shown and f"accuracy {accuracy:.2%}" in shown
    assert accuracy > 0.95


def test_the_accuracy_guard_refuses_and_writes_nothing(tmp_path):
    out = tmp_path / "clipped.onnx"
    result = edgefleet("compress", MODEL, "--pass", "onnx-static method=percentile percentile=10", "--calib", CALIB,
                       "--eval", HELDOUT, "--max-drop", "1", "-o", out, "--latency-runs", 10)
    assert result.returncode == 1 and not out.exists()
    assert "accuracy guard" in last_line(result) and "more than --max-drop 1" in last_line(result)
    assert "Traceback" not in result.stderr


def test_auto_as_json(tmp_path):
    out = tmp_path / "auto.onnx"
    result = edgefleet("compress", MODEL, "--auto", "--max-drop", "1", "--calib", CALIB, "--eval", HELDOUT,
                       "-o", out, "--json", "--latency-runs", 20)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["auto"]["chosen"] and out.is_file() and doc["result"]["file"] == out.name
    assert "] dynamic int8" in result.stderr and "timing" in result.stderr  # progress while it searches
    assert "recovering the pruned model: epoch 30/30" in result.stderr  # and inside the slow passes
    assert "distilling into a" in result.stderr
    # what they train on: the --calib inputs here (no --train), without labels, which the user can tell
    assert "recovering the pruned model: 200 samples, 30 epochs" in result.stderr


def test_json_is_all_that_stdout_carries_even_when_a_library_prints(tmp_path):
    """ONNX Runtime's entropy calibrator prints its histogram steps on stdout."""
    result = edgefleet("compress", MODEL, "--pass", "onnx-preprocess", "--pass", "onnx-static method=entropy",
                       "--calib", CALIB, "-o", tmp_path / "e.onnx", "--json", "--latency-runs", 10)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["steps"][-1]["status"] == "ok"


def test_list_shows_every_pass_and_recipe():
    doc = json.loads(edgefleet("compress", "--list", "--json").stdout)
    assert {"onnx-static", "onnx-dynamic", "onnx-fp16", "onnx-int4", "onnx-preprocess"} <= set(doc["passes"])
    static = {o["name"]: o for o in doc["passes"]["onnx-static"]["options"]}
    assert static["method"]["type"] == "minmax | entropy | percentile" and static["method"]["default"] == "minmax"
    assert "int8-static" in doc["recipes"]


def test_bad_input_is_one_line(tmp_path):
    cases = [
        (("--auto", "--eval", HELDOUT), 2, "--auto needs --max-drop"),
        (("--max-drop", "1"), 2, "need --eval"),
        (("--recipe", "int3"), 1, "no recipe named 'int3'"),
        (("--recipe", "int8-static"), 1, "needs calibration data"),
        (("--recipe", "channels-50"), 1, "recover_epochs needs inputs to train on"),
        (("--pass", "onnx-static per_channel=maybe", "--calib", CALIB), 1, "must be bool"),
        (("--recipe", tmp_path / "missing.toml"), 1, "does not exist"),
        (("--recipe", "int8-static", "--calib", tmp_path / "gone.npz"), 1, "gone.npz does not exist"),
        # a pass of the other format, asked for by name: refused before the model is loaded and timed
        (("--pass", "tflite-fp16"), 1, "pass tflite-fp16 works on tflite models, and digits_cnn.onnx is onnx; "
                                       "for onnx models: onnx-fp16"),
    ]
    for args, code, fragment in cases:
        result = edgefleet("compress", MODEL, "-o", tmp_path / "x.onnx", *args)
        assert result.returncode == code, (args, result.stderr)
        assert fragment in last_line(result), (args, result.stderr)
        assert "Traceback" not in result.stderr and "original" not in result.stdout, (args, result.stdout)
    assert not (tmp_path / "x.onnx").exists()
    missing = edgefleet("compress", tmp_path / "nope.onnx", "-o", tmp_path / "y.onnx")
    assert missing.returncode == 1 and "does not exist" in last_line(missing)
    (tmp_path / "garbage.onnx").write_text("not a model\n")
    garbage = edgefleet("compress", tmp_path / "garbage.onnx", "--recipe", "int8-dynamic", "-o", tmp_path / "z.onnx")
    assert garbage.returncode == 1 and "garbage.onnx is not a readable ONNX model" in last_line(garbage)
    assert "Traceback" not in garbage.stderr and not (tmp_path / "z.onnx").exists()
    folder = edgefleet("compress", tmp_path, "--recipe", "int8-dynamic", "-o", tmp_path / "w.onnx")
    assert folder.returncode == 1 and last_line(folder) == f"error: {tmp_path} is a folder, not a model file"
    # the original is never the output: written over, the float model would be gone
    original = tmp_path / "mine.onnx"
    original.write_bytes(MODEL.read_bytes())
    over = edgefleet("compress", original, "--recipe", "int8-dynamic", "-o", tmp_path / "." / "mine.onnx")
    assert over.returncode == 2 and "is MODEL itself: the original would be overwritten" in last_line(over)
    assert original.read_bytes() == MODEL.read_bytes()
    # a folder as -o or --report: said before the work, not as a traceback after it
    for args in (["-o", tmp_path], ["-o", tmp_path / "v.onnx", "--report", tmp_path]):
        result = edgefleet("compress", MODEL, "--recipe", "int8-dynamic", *args)
        assert result.returncode == 2, result.stderr
        assert last_line(result) == f"Error: {args[-2]} {tmp_path} is a folder: give the name of the file to write"
        assert "Traceback" not in result.stderr and "[1/" not in result.stderr
    assert not (tmp_path / "v.onnx").exists()
    (tmp_path / "a-file").write_text("")
    unwritable = edgefleet("compress", MODEL, "--recipe", "int8-dynamic", "-o", tmp_path / "a-file" / "u.onnx")
    assert unwritable.returncode == 1 and "Traceback" not in unwritable.stderr
    assert last_line(unwritable) == f"error: {tmp_path / 'a-file'} is a file, where a folder is needed"


def test_a_result_in_another_format_is_named_for_it(tmp_path):
    """A student distilled from a TFLite model is an ONNX model: asked for student.tflite, it is written
    as student.onnx and the line says so (a .tflite file holding ONNX runs nowhere); a name that would
    then be MODEL itself is refused, and MODEL is left as it was."""
    out = tmp_path / "student.tflite"
    result = edgefleet("compress", MODELS / "digits_cnn.tflite", "--recipe", "distill", "--calib",
                       MODELS / "digits_train.npz", "--eval", HELDOUT, "-o", out, "--latency-runs", 10)
    assert result.returncode == 0, result.stderr
    assert not out.exists() and (tmp_path / "student.onnx").is_file()
    assert "wrote" in result.stdout and "named .onnx for its format, not student.tflite" in result.stdout

    model = tmp_path / "digits.onnx"
    model.write_bytes(MODEL.read_bytes())
    clash = edgefleet("compress", model, "--recipe", "int8-dynamic", "-o", tmp_path / "digits.tflite")
    assert clash.returncode == 1 and "MODEL itself" in last_line(clash), clash.stderr
    assert model.read_bytes() == MODEL.read_bytes() and not (tmp_path / "digits.tflite").exists()


def test_a_result_slower_than_the_original_says_so(tmp_path):
    """Full int8 of the TFLite transformer runs 2-3x slower than its float model on an x86 CPU
    (docs/benchmarks.md): besides the table's ×p50, a line says it is slower and what gives a faster
    one; the small CNN's int8-dynamic, 0.5-0.85x on every machine measured, gets no such line. In
    ONNX the same CNN's int8-dynamic is 3.4-4x slower everywhere measured, for a known reason the line
    names: ONNX Runtime's dynamically quantized convolutions, and the two recipes that do without."""
    for model, recipe, slower in (("digits_transformer.tflite", "int8-static", True),
                                  ("digits_cnn.tflite", "int8-dynamic", False),
                                  ("digits_cnn.onnx", "int8-dynamic", True)):
        result = edgefleet("compress", MODELS / model, "--recipe", recipe, "--calib", CALIB, "--eval",
                           HELDOUT, "-o", tmp_path / f"{recipe}.{model}", "--latency-runs", 100)
        assert result.returncode == 0, result.stderr
        said = " ".join(result.stderr.split())
        assert ("note: the result runs" in said) == slower, said
        if slower:
            assert "the original's p50 where it was timed (slower, not faster); " in said
            assert "--auto --goal speed hands back only a model faster than the original" in said
        assert ("its 2 ConvInteger nodes (convolutions quantized dynamically) are slow in ONNX Runtime on most "
                "CPUs: int8-static (calibrated on --calib) runs convolutions in int8 without them, int8-weights "
                "gives the same size at float speed; " in said) == model.endswith(".onnx"), said


def test_without_a_recipe_a_cnn_gets_int8_weights_and_a_transformer_dynamic_int8(tmp_path):
    """Without --recipe or --calib, dynamic int8 was the choice: for a CNN a model 3.9-10x slower than
    float (ONNX Runtime's ConvInteger). A model with convolutions now gets int8 weights at float
    speed, one without them dynamic int8, with --calib static int8; a line says which and why."""
    import onnx

    for model, calib, chosen, why in (("digits_cnn.onnx", (), "int8-weights", "no --calib, and the model has "
                                       "convolutions, which dynamic int8 makes slower than float"),
                                      ("digits_transformer.onnx", (), "int8-dynamic", "no --calib"),
                                      ("digits_cnn.onnx", ("--calib", CALIB), "int8-static", "--calib given")):
        out = tmp_path / f"{chosen}.{model}"
        result = edgefleet("compress", MODELS / model, *calib, "-o", out)
        assert result.returncode == 0, result.stderr
        assert f"recipe {chosen}: {why} (--recipe chooses another)" in " ".join(result.stderr.split())
        assert f"({chosen}: 0.2" in result.stdout.splitlines()[-1]
        made = {n.op_type for n in onnx.load(str(out)).graph.node}
        assert "ConvInteger" not in made
