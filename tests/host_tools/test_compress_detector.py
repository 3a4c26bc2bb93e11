"""A detector as torchvision exports one (graphs.detector): it takes one image with no batch axis,
and how many boxes it gives depends on the image (NonZero, then NonMaxSuppression inside an If)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from device_agent.detections import compare
from device_agent.errors import ConfigError
from host_tools.compress import Dataset, ModelFile, load_recipe, run_recipe
from host_tools.compress.detections import gathered
from tests.conftest import FIXTURES
from tests.host_tools import graphs


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    return ModelFile.open(graphs.detector(tmp_path_factory.mktemp("detector") / "detector.onnx"))


def images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((count, 3, 8, 8), dtype=np.float32)


def test_images_stacked_for_a_model_without_a_batch_axis_are_given_one_at_a_time(detector, tmp_path):
    """Data for a model that takes one image [3, 8, 8] holds images along a first axis [n, 3, 8, 8]:
    each call gets one image as the model takes it, and each output keeps each image's detections,
    however many. Before, the data was refused ("takes rank-3 tensors"), with no way to give it; and
    a model that takes a batch of one gave its detections of every image run together."""
    from host_tools.compress.evaluate import bind, outputs_on

    runtime = detector.load()
    bound = bind(Dataset({"image": images(6)}, None, "images"), runtime)
    assert bound.fixed_batch and bound.sample(2)["image"].shape == (3, 8, 8)
    outputs = outputs_on(runtime, bound)
    counts = [len(b) for b in outputs["boxes"]]
    assert len(counts) == 6 and len(set(counts)) > 1  # (a different number of boxes per image)
    for i in (0, 5):
        alone = runtime.run({"image": images(6)[i]})
        assert all(np.array_equal(outputs[name][i], alone[name]) for name in ("boxes", "scores", "labels"))
    with pytest.raises(ConfigError, match=r"takes rank-3 tensors \[3, 8, 8\]; the data's samples stack to shape"):
        bind(Dataset({"image": np.zeros((6, 3, 9, 9), np.float32)}, None, "images"), runtime)
    # taking a batch of one image, [1, 3, 8, 8], as a YOLO export with NMS does: the same detections
    batched = ModelFile.open(graphs.detector(tmp_path / "batched.onnx", batch_of_one=True)).load()
    bound = bind(Dataset({"image": images(6)}, None, "images"), batched)
    assert bound.sample(2)["image"].shape == (1, 3, 8, 8)
    again = outputs_on(batched, bound)
    assert all(np.array_equal(a, b) for name in outputs for a, b in zip(outputs[name], again[name]))


@pytest.mark.parametrize("recipe", ["int8-dynamic", "int8-static", "int8-weights", "fp16"])
def test_a_detector_is_compressed_and_its_detections_matched_to_the_originals(detector, recipe, tmp_path):
    """Each recipe runs on the detector and its fidelity is the share of detections that match the
    original's (IoU ≥ 0.5, the same label), which the guard reads its drop from, and each result runs
    on an image with no detections. fp16 had failed:
    ORT's float16 converter puts the Casts around the NonMaxSuppression it keeps in float32 into the
    main graph, where they read a name only the If's branch makes, and onnx-compact then dropped the
    weights only the branch reads."""
    data = Dataset({"image": images(24)}, None, "images")
    report = run_recipe(detector, load_recipe(recipe, "onnx"), calib=data, eval_data=data, latency_runs=3,
                        workdir=tmp_path)
    assert all(s.status == "ok" for s in report.steps), [(s.label, s.note) for s in report.steps]
    fidelity = report.result.fidelity
    assert fidelity.agreement >= 0.9 and fidelity.cosine > 0.99 and fidelity.mean_abs_error < 0.1, fidelity
    assert report.original.fidelity.agreement == 1.0
    result = report.result.model.load()
    image = images(1, seed=9)[0]
    mine, theirs = result.run({"image": image}), detector.load().run({"image": image})
    rows = compare({k: gathered([theirs[k]], spec) for k, spec in ((s.name, s) for s in result.outputs)},
                   {k: gathered([mine[k]], spec) for k, spec in ((s.name, s) for s in result.outputs)})
    assert rows.agreement >= 0.8
    # an image in which the original finds nothing: the result finds nothing too, and does not fail (ORT's
    # optimizer, given the number of boxes as a named size, had folded the Reshape after NMS into [0, -1])
    nothing = np.zeros((3, 8, 8), np.float32)
    assert len(detector.load().run({"image": nothing})["boxes"]) == 0
    for step in report.steps:  # (each step's model: the float16 converter's output keeps its recorded shapes)
        assert step.model.load().run({"image": nothing})["boxes"].shape == (0, 4), step.label
    if recipe == "int8-static":  # (the post-processing stays float: box arithmetic on however many boxes)
        from host_tools.compress.onnx.boundary import _counted_values

        after_nonzero = _counted_values(onnx.load(str(detector.path)).graph)
        static = onnx.load(str(next(s for s in report.steps if s.label == "onnx-static").model.path)).graph
        quantized = {n.input[0] for n in static.node if n.op_type == "QuantizeLinear"}
        assert quantized and not quantized & after_nonzero, quantized & after_nonzero
    if recipe == "fp16":
        assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in onnx.load(str(report.result.model.path))
                   .graph.initializer)


def _ragged(*values):
    return gathered([np.asarray(v) for v in values], type("Spec", (), {"shape": ["n", 4]})())


def test_detections_pair_by_overlap_and_label_and_count_what_does_not_pair():
    boxes = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [0, 20, 10, 30]], np.float32)
    labels = np.array([1, 2, 1])
    same = compare({"b": _ragged(boxes), "l": _ragged(labels)}, {"b": _ragged(boxes), "l": _ragged(labels)})
    assert (same.agreement, same.cosine, same.max_abs_error) == (1.0, 1.0, 0.0)
    # the model finds the first two (the first moved by 1: IoU 0.68), not the third, and one of its own
    moved = np.array([[1, 1, 11, 11], [20, 20, 30, 30], [50, 50, 60, 60]], np.float32)
    got = compare({"b": _ragged(boxes), "l": _ragged(labels)}, {"b": _ragged(moved), "l": _ragged(labels)})
    assert got.agreement == pytest.approx(2 * 2 / 6) and got.max_abs_error == 1.0
    # the same box with another label does not pair; neither does one that overlaps too little
    relabelled = compare({"b": _ragged(boxes), "l": _ragged(labels)},
                         {"b": _ragged(boxes), "l": _ragged(np.array([1, 2, 2]))})
    assert relabelled.agreement == pytest.approx(2 * 2 / 6)
    shifted = compare({"b": _ragged(boxes[:1])}, {"b": _ragged(boxes[:1] + 5)})  # IoU 25/175
    assert shifted.agreement == 0.0
    # per image: none found by both is full agreement; one the model misses halves that image's
    two = compare({"b": _ragged(boxes[:0], boxes[:1])}, {"b": _ragged(boxes[:0], boxes[:0])})
    assert two.agreement == pytest.approx((1.0 + 0.0) / 2)
    # a box with no area (clipped flat against the image's edge) pairs with itself, not with another
    flat = np.array([[128, 256, 128, 256], [64, 288, 67, 288]], np.float32)
    assert compare({"b": _ragged(flat)}, {"b": _ragged(flat + np.float32(1e-4))}).agreement == 1.0
    assert compare({"b": _ragged(flat)}, {"b": _ragged(flat[::-1] + np.float32(3))}).agreement == 0.0
    # centre and size, as YOLO writes boxes, are read as such
    centred = np.array([[50, 50, 10, 10], [5, 5, 10, 10]], np.float32)
    nudged = centred + np.array([1, 0, 0, 0], np.float32)
    assert compare({"b": _ragged(centred)}, {"b": _ragged(nudged)}).agreement == 1.0


def test_training_passes_say_in_a_line_why_a_detector_does_not_apply(detector, tmp_path):
    """Distillation trains on batches of outputs of one shape; a detector that takes one image and
    gives however many boxes has neither. It says so in one line, as channel pruning says why its
    recovery cannot run this graph, and the recipe goes on."""
    from host_tools.compress.recipes import Recipe, parse_step

    data = Dataset({"image": images(8)}, None, "images")
    recipe = Recipe("detector", (parse_step("distill epochs=1"), parse_step("onnx-prune-channels recover-epochs=1"),
                                 parse_step("onnx-weight-only")))
    report = run_recipe(detector, recipe, calib=data, eval_data=data, latency_runs=3, workdir=tmp_path)
    assert [s.status for s in report.steps][-1] == "ok"
    distill, prune = report.steps[:2]
    assert distill.status == "skipped"
    assert distill.note.endswith("input 'image' takes one sample with no batch axis: training runs on batches")
    assert prune.status == "skipped" and "cannot run op(s) ArgMax, If, NonZero" in prune.note
    # taking a batch of one image, as a YOLO export with NMS does: its boxes are what has no one shape
    batched = ModelFile.open(graphs.detector(tmp_path / "batched.onnx", batch_of_one=True))
    report = run_recipe(batched, Recipe("detector", (parse_step("distill epochs=1"),)), calib=data, eval_data=data,
                        latency_runs=3, workdir=tmp_path / "batched")
    assert report.steps[0].status == "skipped"
    assert "the size of output 'boxes' depends on the input (detections after NMS)" in report.steps[0].note


def test_auto_tries_every_candidate_on_a_detector_and_keeps_one_within_the_tolerance(detector, tmp_path):
    """--auto's whole ladder on the detector: no candidate fails. Entropy calibration had stopped in
    ONNX Runtime's histogram collector ("inhomogeneous shape": it stacks each tensor's values over
    the batches, and after NonZero their sizes differ), the sensitivity search in stacking the
    outputs; the ones that do not apply say why."""
    from host_tools.compress.auto import search

    data = Dataset({"image": images(24)}, None, "images")
    out = tmp_path / "auto.onnx"
    report = search(detector, eval_data=data, calib=data, max_drop=1.0, latency_runs=3, out=out)
    assert report.auto.failures() == {}, report.auto.failures()
    assert report.auto.verdicts["static int8 per-channel, entropy"].startswith(("within", "loses", "chosen"))
    assert report.auto.verdicts["static int8, 1 sensitive node in float"].startswith(("within", "loses", "chosen"))
    assert report.chosen is not None and out.is_file() and report.chosen.fidelity.agreement >= 0.97


def test_edgefleet_compress_and_bundle_build_take_a_detector(detector, keys, tmp_path):
    """The commands a user types: images stacked in an .npz for a model that takes one image, a line
    that says how they are given, the table's caption saying what its agreement column means, and a
    bundle of the result whose sample a device checks."""
    import json

    from device_agent.bundle import BundleReader
    from device_agent.bundle.signing import trusted_keys
    from device_agent.runtime import load_runtime
    from device_agent.sample import check_sample
    from tests.conftest import edgefleet

    data, out, report = tmp_path / "images.npz", tmp_path / "int8.onnx", tmp_path / "report.json"
    np.savez(data, image=images(16))
    result = edgefleet("compress", detector.path, "--recipe", "int8-static", "--calib", data, "--eval", data,
                       "-o", out, "--report", report, "--latency-runs", 10)
    assert result.returncode == 0, result.stderr
    assert "detector.onnx takes one sample with no batch axis (image): the data's samples, along its first axis, " \
           "one at a time" in result.stderr
    assert "the share of detections that match the original's" in " ".join(result.stdout.split())
    assert json.loads(report.read_text())["steps"][-1]["fidelity"]["agreement"] >= 0.9
    bundle = tmp_path / "d.efb"
    built = edgefleet("bundle", "build", out, "--name", "detector", "--version", "1.0.0", "--key", keys["key"],
                      "-o", bundle, "--compression-report", report)
    assert built.returncode == 0, built.stderr
    with BundleReader(bundle) as reader:
        manifest = reader.verify(trusted_keys([keys["pub"]]), extract_to=tmp_path / "bundle").manifest
    check_sample(load_runtime("onnxruntime", tmp_path / "bundle" / out.name), manifest, tmp_path / "bundle")


# --- a TFLite detector whose post-processing pads its detections ------------------------------


@pytest.fixture(scope="module")
def ssd(tmp_path_factory):
    from tests.host_tools import tflite_graphs

    return ModelFile.open(tflite_graphs.ssd(tmp_path_factory.mktemp("ssd") / "ssd.tflite"))


def by_hand(model: ModelFile, data: np.ndarray) -> dict[str, np.ndarray]:
    """Each image's detections, as a user reads TFLite_Detection_PostProcess: the first `count` rows."""
    runtime = model.load()
    names = [o.name for o in runtime.outputs]  # boxes, classes, scores, count
    rows = {name: [] for name in names[:3]}
    for image in data:
        out = runtime.run({runtime.inputs[0].name: image[None]})
        n = int(out[names[3]][0])
        for name in names[:3]:
            rows[name].append(out[name][0][:n].astype(np.int64 if name == names[1] else np.float32))
    return {name: gathered(values, runtime.outputs[0]) for name, values in rows.items()}


@pytest.mark.parametrize("recipe", ["int8-dynamic", "int8-static", "fp16"])
def test_a_tflite_detector_with_padded_detections_is_compared_by_the_rows_that_are_detections(ssd, recipe,
                                                                                                 tmp_path):
    """The TensorFlow Object Detection API's SSDs end in TFLite_Detection_PostProcess: boxes [1, 10, 4],
    classes [1, 10] (floats), scores [1, 10], and how many rows are detections. Each recipe runs, and
    its agreement is the share of the detections that pair with the original's, as for any detector.
    Before, those outputs were read as a classifier's: the boxes' 4 coordinates as 4 class scores,
    and the "top-1 agreement" the guard read its drop from was the share of boxes whose largest
    coordinate was the same one (61 % for int8-static here, against 82 % of detections that pair)."""
    data = np.random.default_rng(1).random((12, 3, 64, 64), dtype=np.float32)
    report = run_recipe(ssd, load_recipe(recipe, "tflite"), calib=Dataset({"x": data}, None, "images"),
                        eval_data=Dataset({"x": data}, None, "images"), latency_runs=3, workdir=tmp_path)
    want = by_hand(ssd, data)
    original = report.original.outputs
    assert list(original) == list(want) and all(len(a) == len(b) and np.array_equal(a, b)
                                                for name in want for a, b in zip(original[name], want[name]))
    assert 0 < sum(map(len, want["TFLite_Detection_PostProcess"])) < 10 * len(data)  # (some rows are padding)
    assert report.original.fidelity.agreement == 1.0
    done = [s for s in report.steps if s.status == "ok"]
    assert done and report.compressed, [(s.label, s.note) for s in report.steps]
    for step in done:
        assert step.fidelity.agreement == pytest.approx(compare(want, by_hand(step.model, data)).agreement)
    assert report.result.fidelity.agreement > 0.5
    # full int8 had put a QUANTIZE and a DEQUANTIZE after the op it leaves float: its boxes, scores and
    # classes came out rounded to 8 bits (256 values at most), and 63 % of the detections paired, not 77 %
    boxes = np.concatenate(list(by_hand(report.result.model, data)["TFLite_Detection_PostProcess"]))
    assert len(np.unique(boxes)) > 256


def test_a_tflite_detector_is_pruned_and_recovered_up_to_its_post_processing(ssd, tmp_path):
    """PyTorch has no TFLite_Detection_PostProcess, and nothing in it trains: recovery after channel
    pruning trains what the op reads, the box encodings and class scores, against the original's,
    and puts the weights back into the whole pruned model, which keeps the op. (channels-50 had been
    skipped on such a model: "fine-tuning cannot run op(s) CUSTOM in PyTorch".)"""
    from host_tools.compress.recipes import Recipe, Step
    from host_tools.compress.tflite.detection import heads_only

    data = Dataset({"x": np.random.default_rng(2).random((32, 3, 64, 64), dtype=np.float32)}, None, "images")
    said = []
    pruned, recovered = (run_recipe(ssd, Recipe("test", (Step("tflite-prune-channels", {"ratio": 0.5,
                                                                                        "recover_epochs": epochs}),)),
                                    calib=data, eval_data=data, latency_runs=3, workdir=tmp_path / str(epochs),
                                    progress=said.append).result for epochs in (0, 20))
    assert recovered.status == "ok" and recovered.label == "tflite-prune-channels", recovered.note
    assert recovered.model.load().padded_detections is not None and recovered.size_bytes < 0.6 * ssd.size_bytes
    assert any("recovering its box encodings and class scores" in line for line in said)

    def heads(model: ModelFile) -> list[np.ndarray]:  # box encodings [32, 960, 4], class scores [32, 960, 3]
        runtime = heads_only(model, tmp_path).load()
        name = runtime.inputs[0].name
        outputs = [runtime.run({name: x[None]}) for x in data.arrays["x"]]
        return [np.concatenate([o[spec.name] for o in outputs]) for spec in runtime.outputs]

    (boxes, scores), pruned, recovered = heads(ssd), heads(pruned.model), heads(recovered.model)
    # the scores (softmax, within 0.015 of each other) are where pruning moved the model, and where
    # recovery brings it back; the encodings (spread 0.3) moved by a thousandth, and stay about there
    assert np.abs(recovered[1] - scores).mean() < 0.75 * np.abs(pruned[1] - scores).mean()
    assert np.abs(recovered[0] - boxes).mean() < 0.01 * boxes.std()


def test_a_raw_detection_head_is_scored_by_its_class_scores_not_its_box_coordinates(tmp_path):
    """The detector fixture gives its raw head, as an SSD exported before decoding does: boxes
    [N, 960, 4] beside class scores [N, 960, 3]. The boxes' last axis is coordinates: before, the
    agreement the guard read was the share of boxes whose largest coordinate stayed the same one.
    It is now each anchor's top class, from the scores, and the boxes count in cosine and errors."""
    model = ModelFile.open(FIXTURES / "detector.onnx")
    data = Dataset({"image": np.random.default_rng(4).random((16, 3, 64, 64), dtype=np.float32)}, None, "images")
    report = run_recipe(model, load_recipe("int8-static", "onnx"), calib=data, eval_data=data, latency_runs=3,
                        workdir=tmp_path)
    ref, out = report.original.outputs, report.result.outputs
    assert set(ref) == {"boxes", "scores"} and report.compressed
    top_class = float((ref["scores"].argmax(-1) == out["scores"].argmax(-1)).mean())
    largest_coordinate = float((ref["boxes"].argmax(-1) == out["boxes"].argmax(-1)).mean())
    assert report.result.fidelity.agreement == pytest.approx(top_class) and top_class != largest_coordinate


def test_box_encodings_beside_class_scores_are_trained_as_values():
    """Trained as class scores, by the KL divergence of their softmax, boxes off by the same amount in
    all four coordinates would look right, and nothing would be learnt. Beside an output of class
    scores, an output [N, anchors, 4] is boxes, and its loss is the mean squared error."""
    import torch

    from host_tools.compress.torch.trainer import Schedule, distill

    class Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.boxes, self.scores = torch.nn.Linear(8, 12), torch.nn.Linear(8, 6)

        def forward(self, x):
            return self.boxes(x).reshape(-1, 3, 4), self.scores(x).reshape(-1, 3, 2)

    torch.manual_seed(0)
    head = Head()
    x = np.random.default_rng(0).random((64, 8), dtype=np.float32)
    with torch.no_grad():
        boxes, scores = (t.numpy() for t in head(torch.from_numpy(x)))
    target = boxes + 0.5  # (each box moved by 0.5, every coordinate)
    distill(head, [x], [target, scores], None, Schedule(epochs=100, lr=1e-2), "onnx")
    with torch.no_grad():
        assert float(np.abs(head(torch.from_numpy(x))[0].numpy() - target).mean()) < 0.05
