"""The committed reference model is what models/digits_cnn.json says it is."""

import json

import numpy as np

from device_agent.runtime import load_runtime
from tests.conftest import MODELS


def test_committed_model_reaches_its_recorded_accuracy():
    meta = json.loads((MODELS / "digits_cnn.json").read_text())
    with np.load(MODELS / "digits_heldout.npz") as data:
        x, y = data["x"], data["y"]
    assert len(y) == meta["heldout_samples"]
    runtime = load_runtime("onnxruntime", MODELS / meta["file"])
    accuracy = float((runtime.run({"image": x})["logits"].argmax(1) == y).mean())
    assert round(accuracy, 4) == meta["heldout_accuracy"]
    assert accuracy > 0.95


def test_committed_model_files_stay_small():
    for path in MODELS.iterdir():
        if path.suffix in (".onnx", ".tflite", ".npz"):
            assert path.stat().st_size < 2 * 2**20, path.name
