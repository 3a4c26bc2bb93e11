"""A detector's labels are ground-truth boxes (`label_boxes`), and its accuracy is their mAP50-95 as
COCO computes it: what `--max-drop` guards on, as a classifier's top-1 accuracy."""

from __future__ import annotations

import re

import numpy as np
import pytest

from device_agent.detections import as_objects
from device_agent.errors import ConfigError
from host_tools.compress import Dataset, ModelFile, load_dataset, load_recipe, run_recipe, truth, yolo
from tests.conftest import MODELS, edgefleet
from tests.host_tools import graphs


def detections(per_image: list[tuple[list, list, list]]) -> dict[str, np.ndarray]:
    """Outputs as a detector gives them, one array per image: (boxes, labels, scores) each."""
    return {"boxes": as_objects([np.array(b, np.float32).reshape(-1, 4) for b, _, _ in per_image]),
            "labels": as_objects([np.array(c, np.int64) for _, c, _ in per_image]),
            "scores": as_objects([np.array(s, np.float32) for _, _, s in per_image])}


def test_map_is_cocos():
    """By hand: class 0 has two boxes, found at scores 0.9 and 0.7, with a false one at 0.8 between
    them: precision 1 up to recall 0.5, then 2/3 (101 recall points: (51 + 50 x 2/3) / 101); class 1's
    one box is never found: 0. A box that overlaps its truth at IoU 0.64 counts at 0.5 to 0.6 only."""
    known = truth.from_table([[0, 0, 0, 0, 10, 10], [0, 1, 20, 20, 30, 30], [1, 0, 5, 5, 15, 15]], 2, "t")
    found = detections([([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 0], [0.9, 0.8]), ([[5, 5, 15, 15]], [0], [0.7])])
    expected = (51 + 50 * 2 / 3) / 101 / 2
    assert truth.mean_average_precision(found, known) == truth.Precision(pytest.approx(expected),
                                                                         pytest.approx(expected))
    shifted = detections([([[0, 0, 10, 10], [22, 20, 32, 30]], [0, 1], [0.9, 0.8]), ([[5, 5, 15, 15]], [0], [0.7])])
    precision = truth.mean_average_precision(shifted, known)  # (class 1's box at IoU 8 x 10 / 120 = 0.667)
    assert precision.map50 == 1.0 and precision.map50_95 == pytest.approx((1 + 4 / 10) / 2)


def random_case(seed: int):
    """20 images of up to 5 boxes of 3 classes; detections jittered from them, some mislabelled,
    and some made up, with random scores."""
    rng = np.random.default_rng(seed)
    rows, found = [], []
    for i in range(20):
        k = int(rng.integers(0, 6))
        corner = rng.uniform(0, 80, (k, 2))
        boxes = np.column_stack([corner, corner + rng.uniform(5, 30, (k, 2))])
        classes = rng.integers(0, 3, k)
        rows += [(i, c, *b) for c, b in zip(classes, boxes)]
        picked = rng.integers(0, k, int(rng.integers(0, 8))) if k else np.zeros(0, np.int64)
        jittered = boxes[picked] + rng.normal(0, 3, (len(picked), 4))
        jittered[:, 2:] = np.maximum(jittered[:, 2:], jittered[:, :2] + 1)
        labels = np.where(rng.random(len(picked)) < 0.85, classes[picked], rng.integers(0, 3, len(picked)))
        made_up = rng.uniform(0, 80, (int(rng.integers(0, 4)), 2))
        made_up = np.column_stack([made_up, made_up + rng.uniform(5, 30, made_up.shape)])
        found.append((np.vstack([jittered, made_up]), np.concatenate([labels, rng.integers(0, 3, len(made_up))]),
                      rng.random(len(picked) + len(made_up))))
    return np.array(rows), found


@pytest.mark.parametrize("seed, map50_95, map50", [(0, 0.060073, 0.185318), (1, 0.077844, 0.233770),
                                                   (4, 0.051695, 0.111411)])
def test_map_equals_pycocotools_cocoeval(seed, map50_95, map50):
    """The numbers are pycocotools 2.0.11's COCOeval ("bbox", stats[0] and [1]) on these detections,
    written as it takes them (x, y, width, height)."""
    rows, found = random_case(seed)
    precision = truth.mean_average_precision(detections(found), truth.from_table(rows, 20, "r"))
    assert precision.map50_95 == pytest.approx(map50_95, abs=1e-6)
    assert precision.map50 == pytest.approx(map50, abs=1e-6)


def test_label_boxes_come_from_an_npz_a_folder_or_a_loader_and_bad_rows_are_one_line(tmp_path):
    images = np.zeros((3, 1, 8, 8), np.float32)
    table = np.array([[0, 1, 0, 0, 4, 4], [2, 0, 1, 1, 3, 5], [2, 2, 0, 0, 8, 8]], np.float32)
    np.savez(tmp_path / "data.npz", images=images, label_boxes=table)
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, image in enumerate(images):
        np.save(folder / f"{i}.npy", image)
    np.save(folder / "label_boxes.npy", table)
    (tmp_path / "loader.py").write_text(
        "import numpy as np\n"
        "def load():\n"
        "    return {'images': np.zeros((3, 1, 8, 8), np.float32),\n"
        "            'label_boxes': [[[1, 0, 0, 4, 4]], np.zeros((0, 5)), [[0, 1, 1, 3, 5], [2, 0, 0, 8, 8]]]}\n")
    for source in (tmp_path / "data.npz", folder, tmp_path / "loader.py"):
        labels = load_dataset(str(source)).labels
        assert truth.is_truth(labels), source
        assert [v.tolist() for v in labels] == [[[1, 0, 0, 4, 4]], [], [[0, 1, 1, 3, 5], [2, 0, 0, 8, 8]]]
    bad = {"sample must be from 0 to 2": [[3, 0, 0, 0, 1, 1]], "whole numbers": [[0, 0.5, 0, 0, 1, 1]],
           "x2 must not be less than x1": [[0, 0, 5, 0, 1, 1]], "not finite": [[0, 0, np.nan, 0, 1, 1]],
           "class must be 0 or more": [[1, -1, 0, 0, 1, 1]], "a [boxes, 6] array, not [1, 5]": [[0, 0, 0, 1, 1]],
           "holds no boxes": np.zeros((0, 6))}
    for said, rows in bad.items():
        np.savez(tmp_path / "bad.npz", images=images, label_boxes=np.array(rows, np.float32))
        with pytest.raises(ConfigError, match=re.escape(said)):
            load_dataset(str(tmp_path / "bad.npz"))
    for rows in ("[[1, 0, 0, 4]]", "[[1, 0, 0, 4, 4], [2, 0]]", "[['a', 0, 0, 4, 4]]"):  # (a loader's, per sample)
        (tmp_path / "odd.py").write_text("import numpy as np\ndef load():\n"
                                         f"    return {{'images': np.zeros((1, 1, 8, 8)), 'label_boxes': [{rows}]}}\n")
        with pytest.raises(ConfigError, match=re.escape("label_boxes of sample 0 must be rows of (class, x1")):
            load_dataset(str(tmp_path / "odd.py"))
    np.savez(tmp_path / "both.npz", images=images, labels=np.zeros(3), label_boxes=table)
    with pytest.raises(ConfigError, match="both labels and label_boxes"):
        load_dataset(str(tmp_path / "both.npz"))
    (tmp_path / "ragged.py").write_text("import numpy as np\ndef load():\n    return np.zeros((2, 4), np.float32), "
                                        "[np.zeros((1, 5)), np.zeros((2, 5))]\n")
    with pytest.raises(ConfigError, match="differ in shape from sample to sample; a detector's boxes go in label_"):
        load_dataset(str(tmp_path / "ragged.py"))


def test_a_yolo_model_is_guarded_on_its_map_decoded_as_yolo_val_decodes(tmp_path):
    """The truth is the original's own detections as `yolo val` finds them (every anchor over 0.001):
    the original scores 100 % only if it is decoded so for its mAP (at predict's 0.25 it misses the
    boxes between); the int8 model loses points of mAP, which are its drop, while its agreement with
    the original stays at predict's thresholds."""
    model = ModelFile.open(graphs.yolo(tmp_path / "yolo.onnx"))
    images = np.random.default_rng(3).random((12, 3, 32, 32), dtype=np.float32)
    runtime = model.load()
    head = yolo.head(model, runtime)
    raw = np.concatenate([runtime.run({"images": image[None]})[head.output] for image in images])
    found = yolo.decoded({head.output: raw}, yolo.for_validation(head))
    rows = np.concatenate([np.column_stack([np.full(len(b), i), c, b]) for i, (b, c) in
                           enumerate(zip(found["output0.boxes"], found["output0.labels"]))])
    predicted = yolo.decoded({head.output: raw}, head)["output0.boxes"]
    assert len(rows) > sum(map(len, predicted))  # (boxes that only validation's threshold finds)
    data = Dataset({"images": images}, truth.from_table(rows, len(images), "truth"), "truth")
    report = run_recipe(model, load_recipe("int8-static", "onnx"), calib=data, eval_data=data, latency_runs=3,
                        workdir=tmp_path / "w")
    assert report.original.fidelity.accuracy == 1.0 and report.original.fidelity.map50 == 1.0
    result = report.result
    assert result.fidelity.accuracy < 1.0 and result.fidelity.agreement > result.fidelity.accuracy
    doc = report.to_dict()
    assert doc["evaluation"]["accuracy"] == truth.METRIC
    assert doc["steps"][-1]["fidelity"]["map50"] == pytest.approx(result.fidelity.map50, abs=1e-5)
    assert doc["steps"][-1]["drop_points"] == pytest.approx((1 - result.fidelity.accuracy) * 100, abs=1e-3)


def test_boxes_for_a_model_that_gives_no_detections_are_one_line(tmp_path):
    """A classifier given a detector's labels: refused in one line, before anything is written."""
    images = np.load(MODELS / "digits_heldout.npz")["x"][:4]
    np.savez(tmp_path / "boxes.npz", x=images, label_boxes=np.array([[0, 1, 0, 0, 4, 4]], np.float32))
    out = tmp_path / "out.onnx"
    result = edgefleet("compress", MODELS / "digits_cnn.onnx", "--recipe", "fp16", "--eval", tmp_path / "boxes.npz",
                       "-o", out)
    assert result.returncode == 1 and not out.exists() and "Traceback" not in result.stderr
    last = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert "the labels are boxes (label_boxes), and the model gives no detections to score against them" in last


def test_a_detectors_bundle_says_its_accuracy_is_map(tmp_path, keys):
    """As a user runs it: label_boxes in the evaluation .npz, the report into a bundle, whose
    provenance line names the accuracy for what it is."""
    model = graphs.yolo(tmp_path / "yolo.onnx")
    images = np.random.default_rng(4).random((8, 3, 32, 32), dtype=np.float32)
    np.savez(tmp_path / "eval.npz", images=images,
             label_boxes=np.array([[i, i % 3, 4, 4, 20, 24] for i in range(8)], np.float32))
    out, report = tmp_path / "yolo.fp16.onnx", tmp_path / "report.json"
    result = edgefleet("compress", model, "--recipe", "fp16", "--eval", tmp_path / "eval.npz", "-o", out,
                       "--report", report, "--latency-runs", 10)
    assert result.returncode == 0, result.stderr
    assert "mAP50-95 against the labelled boxes" in " ".join(result.stdout.split())
    bundle = tmp_path / "yolo.efb"
    built = edgefleet("bundle", "build", out, "--name", "yolo", "--version", "1.0.0", "--key", keys["key"],
                      "-o", bundle, "--compression-report", report)
    assert built.returncode == 0, built.stderr
    assert "fp16 -> " in (shown := edgefleet("bundle", "inspect", bundle).stdout) and "% (drop " in shown
    assert "mAP50-95 " in shown and "accuracy " not in shown
