"""The health check a device runs before it activates a model."""

from pathlib import Path

import numpy as np
import pytest

from device_agent.bundle.signing import trusted_keys
from device_agent.errors import HealthCheckError, ModelError
from device_agent.runtime import load_runtime
from device_agent.sample import check_sample, load_sample, save_sample
from device_agent.store import BundleStore


@pytest.fixture
def installed(make_bundle, keys, tmp_path):
    return BundleStore(tmp_path).install(make_bundle(), trusted_keys([keys["pub"]]))


def test_reference_bundle_passes_its_own_sample_check(installed):
    runtime = load_runtime("onnxruntime", installed.files / installed.manifest.model_file)
    inputs = check_sample(runtime, installed.manifest, installed.files)
    assert inputs["image"].shape == (1, 1, 8, 8)


def test_wrong_expected_output_fails_the_check(installed):
    sample_path = installed.files / installed.manifest.sample.file
    inputs, outputs = load_sample(sample_path)
    save_sample(sample_path, inputs, {"logits": outputs["logits"] + 1.0})
    runtime = load_runtime("onnxruntime", installed.files / installed.manifest.model_file)
    with pytest.raises(HealthCheckError, match="differs from the expected"):
        check_sample(runtime, installed.manifest, installed.files)


def test_wrong_output_shape_fails_the_check(installed):
    sample_path = installed.files / installed.manifest.sample.file
    inputs, outputs = load_sample(sample_path)
    save_sample(sample_path, inputs, {"logits": np.zeros((2, 10), np.float32)})
    runtime = load_runtime("onnxruntime", installed.files / installed.manifest.model_file)
    with pytest.raises(HealthCheckError, match="shape"):
        check_sample(runtime, installed.manifest, installed.files)


def test_a_model_file_that_is_not_a_model_is_a_model_error(tmp_path: Path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"this is not onnx")
    with pytest.raises(ModelError, match="cannot load"):
        load_runtime("onnxruntime", bad)


def test_runtime_describes_the_reference_model(reference_model):
    runtime = load_runtime("onnxruntime", reference_model)
    (inp,), (out,) = runtime.inputs, runtime.outputs
    assert (inp.name, inp.dtype, inp.shape[1:]) == ("image", "float32", (1, 8, 8))
    assert (out.name, out.dtype, out.shape[1:]) == ("logits", "float32", (10,))
    assert runtime.run({"image": np.zeros((3, 1, 8, 8), np.float32)})["logits"].shape == (3, 10)


def test_a_detector_whose_device_finds_another_number_of_boxes_is_checked_box_by_box(keys, tmp_path):
    """A detector's sample output holds however many boxes the host found; a device's rounding (or
    TensorRT's) can move a box across a score threshold. Where the number differs, the boxes are
    paired with the expected ones (IoU >= 0.5, the same label): the check passes when 90 % pair and
    the pairs agree within the tolerance, and fails saying how many were found and expected. With
    the same number, every output is compared value by value, as before."""
    from device_agent.bundle import BundleReader
    from host_tools.packaging import build_bundle
    from tests.host_tools import graphs

    model = graphs.detector(tmp_path / "detector.onnx")
    sample = {"image": np.random.default_rng(3).random((3, 8, 8), dtype=np.float32)}
    manifest = build_bundle(model, name="detector", version="1.0.0", key=keys["key"], out=tmp_path / "d.efb",
                            sample=sample)
    with BundleReader(tmp_path / "d.efb") as reader:
        reader.verify(trusted_keys([keys["pub"]]), extract_to=tmp_path / "bundle")
    runtime = load_runtime("onnxruntime", tmp_path / "bundle" / "detector.onnx")
    path = tmp_path / "bundle" / manifest.sample.file
    inputs, found = load_sample(path)
    assert len(found["boxes"]) >= 10
    check_sample(runtime, manifest, tmp_path / "bundle")

    def expect(rows, boxes=None):
        save_sample(path, inputs, {"boxes": found["boxes"][rows] if boxes is None else boxes,
                                   "scores": found["scores"][rows], "labels": found["labels"][rows]})

    expect(slice(1, None))  # the device finds one box more than the host did
    check_sample(runtime, manifest, tmp_path / "bundle")
    expect(slice(0, len(found["boxes"]) // 2))  # half of them more
    with pytest.raises(HealthCheckError, match=rf"the model found {len(found['boxes'])} boxes \('boxes'\) where "
                                               rf"the sample expects {len(found['boxes']) // 2}, and 67% of them pair"):
        check_sample(runtime, manifest, tmp_path / "bundle")
    moved = found["boxes"][1:] + np.float32(0.05)  # one more, and the others 0.05 off: beyond the tolerance
    expect(slice(1, None), moved)
    with pytest.raises(HealthCheckError, match="those that pair differ from the expected"):
        check_sample(runtime, manifest, tmp_path / "bundle")
    expect(slice(None), found["boxes"] + np.float32(0.05))  # as many, 0.05 off: compared value by value
    with pytest.raises(HealthCheckError, match="output 'boxes' differs from the expected sample output"):
        check_sample(runtime, manifest, tmp_path / "bundle")


def test_a_tflite_detector_whose_post_processing_pads_its_detections_is_checked_by_them(keys, tmp_path):
    """A TFLite SSD's outputs have a fixed number of rows, of which its count output says how many
    are detections. Where the device counts another number than the sample holds, the rows that are
    detections are paired as any detector's; the padding is never compared."""
    from device_agent.bundle import BundleReader
    from host_tools.packaging import build_bundle
    from tests.host_tools import tflite_graphs

    model = tflite_graphs.ssd(tmp_path / "ssd.tflite")
    image = np.random.default_rng(5).random((1, 3, 64, 64), dtype=np.float32)
    runtime = load_runtime("tflite", model)
    manifest = build_bundle(model, name="ssd", version="1.0.0", key=keys["key"], out=tmp_path / "s.efb",
                            sample={runtime.inputs[0].name: image})
    with BundleReader(tmp_path / "s.efb") as reader:
        reader.verify(trusted_keys([keys["pub"]]), extract_to=tmp_path / "bundle")
    boxes, classes, scores, count = runtime.padded_detections
    path = tmp_path / "bundle" / manifest.sample.file
    inputs, found = load_sample(path)
    n = int(found[count][0])
    assert 6 <= n < 10  # (one fewer still pairs 90 %, and some rows are padding)
    check_sample(runtime, manifest, tmp_path / "bundle")

    def expect(rows: int, padding: float = 0.0, off: float = 0.0):
        kept = {name: found[name].copy() for name in found}
        kept[count][0] = rows
        kept[boxes][0, rows:] = kept[classes][0, rows:] = kept[scores][0, rows:] = padding
        kept[boxes][0, :rows] += np.float32(off)
        save_sample(path, inputs, kept)

    expect(n, padding=7.0)  # the same detections, other padding: not compared
    check_sample(runtime, manifest, tmp_path / "bundle")
    expect(n - 1)  # the device finds one more
    check_sample(runtime, manifest, tmp_path / "bundle")
    expect(n // 2)
    with pytest.raises(HealthCheckError, match=rf"the model found {n} boxes \('{boxes}'\) where the sample expects "
                                               rf"{n // 2}"):
        check_sample(runtime, manifest, tmp_path / "bundle")
    expect(n, off=0.05)  # as many, 0.05 off
    with pytest.raises(HealthCheckError, match=f"output '{boxes}' differs from the expected sample output"):
        check_sample(runtime, manifest, tmp_path / "bundle")
