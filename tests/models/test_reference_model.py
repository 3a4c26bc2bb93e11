"""The committed reference models are what their models/*.json say they are."""

import json

import numpy as np
import onnx
import pytest

from device_agent.runtime import load_runtime
from tests.conftest import MODELS


@pytest.mark.parametrize("meta_file", ["digits_cnn.json", "digits_transformer.json", "digits_vgg.json",
                                       "digits_resnet.json"])
def test_committed_model_reaches_its_recorded_accuracy(meta_file):
    meta = json.loads((MODELS / meta_file).read_text())
    with np.load(MODELS / "digits_heldout.npz") as data:
        x, y = data["x"], data["y"]
    assert len(y) == meta["heldout_samples"]
    runtime = load_runtime("onnxruntime", MODELS / meta["file"])
    accuracy = float((runtime.run({"image": x})["logits"].argmax(1) == y).mean())
    assert round(accuracy, 4) == meta["heldout_accuracy"]
    assert accuracy > 0.95


@pytest.mark.parametrize("name", ["digits_cnn", "digits_transformer", "digits_vgg"])
def test_the_tflite_form_is_the_same_model_as_the_onnx_one(name):
    """models/convert_digits_tflite.py loads each ONNX model's weights into its PyTorch module and
    converts it with litert-torch: the agent's TFLite runtime reaches the recorded accuracy, which
    is the ONNX model's, and gives the same logits."""
    meta = json.loads((MODELS / f"{name}_tflite.json").read_text())
    onnx_meta = json.loads((MODELS / f"{name}.json").read_text())
    assert meta["heldout_accuracy"] == onnx_meta["heldout_accuracy"]
    with np.load(MODELS / "digits_heldout.npz") as data:
        x, y = data["x"], data["y"]
    tflite = load_runtime("tflite", MODELS / meta["file"])
    reference = load_runtime("onnxruntime", MODELS / onnx_meta["file"])
    (spec,) = tflite.inputs
    logits = np.concatenate([next(iter(tflite.run({spec.name: sample[None]}).values())) for sample in x])
    assert round(float((logits.argmax(1) == y).mean()), 4) == meta["heldout_accuracy"]
    np.testing.assert_allclose(logits, reference.run({"image": x})["logits"], rtol=1e-3, atol=1e-3)


def test_committed_model_files_stay_small():
    for path in MODELS.iterdir():
        if path.suffix in (".onnx", ".tflite", ".npz"):
            assert path.stat().st_size < 2 * 2**20, path.name


def test_the_second_reference_model_is_a_transformer_not_a_cnn():
    ops = {n.op_type for n in onnx.load(str(MODELS / "digits_transformer.onnx")).graph.node}
    assert {"MatMul", "Softmax", "LayerNormalization"} <= ops and "Conv" not in ops


def test_calibration_and_training_inputs_never_overlap_the_heldout_set():
    with np.load(MODELS / "digits_heldout.npz") as h, np.load(MODELS / "digits_train.npz") as t, \
            np.load(MODELS / "digits_calib.npz") as c:
        heldout = {row.tobytes() for row in h["x"]}
        assert not heldout & {row.tobytes() for row in t["x"]}
        assert {row.tobytes() for row in c["x"]} <= {row.tobytes() for row in t["x"]}
