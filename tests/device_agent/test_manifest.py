import pytest

from device_agent.bundle import FileEntry, Manifest, SampleCheck, TensorSpec
from device_agent.errors import ManifestError

SHA = "a" * 64


def manifest(**changes) -> Manifest:
    fields = dict(
        name="digits-cnn", version="1.2.3", runtime="onnxruntime", model_file="model.onnx",
        files=(FileEntry("model.onnx", 10, SHA), FileEntry("sample.npz", 5, SHA)),
        inputs=(TensorSpec("image", ("batch", 1, 8, 8), "float32"),),
        outputs=(TensorSpec("logits", ("batch", 10), "float32"),),
        sample=SampleCheck("sample.npz"), created_at="2026-11-22T00:00:00+00:00",
    )
    fields.update(changes)
    return Manifest(**fields)


def test_json_round_trip_is_exact_and_canonical():
    m = manifest(compression={"method": "x"}, metrics={"accuracy": 0.98})
    data = m.to_json()
    again = Manifest.from_json(data)
    assert again == m
    assert again.to_json() == data  # the signed bytes survive a parse


@pytest.mark.parametrize("changes, message", [
    ({"version": "1.2"}, "semantic version"),
    ({"name": "Digits CNN"}, "model name"),
    ({"runtime": "tensorrt"}, "runtime"),
    ({"model_file": "other.onnx"}, "model file"),
    ({"files": (FileEntry("../model.onnx", 1, SHA),)}, "unsafe file path"),
    ({"files": (FileEntry("/etc/passwd", 1, SHA),)}, "unsafe file path"),
    ({"files": (FileEntry("model.onnx", 1, "zz"), FileEntry("sample.npz", 1, SHA))}, "invalid sha256"),
    ({"files": (FileEntry("model.onnx", -1, SHA), FileEntry("sample.npz", 1, SHA))}, "invalid size"),
    ({"inputs": ()}, "no inputs"),
    ({"inputs": (TensorSpec("image", (1,), "complex64"),)}, "unsupported dtype"),
])
def test_invalid_manifests_are_refused_with_a_reason(changes, message):
    with pytest.raises(ManifestError, match=message):
        manifest(**changes)


@pytest.mark.parametrize("payload", [b"not json", b"[]", b'{"format_version": 99}', b'{"format_version": 1}'])
def test_malformed_manifest_json_is_a_manifest_error(payload):
    with pytest.raises(ManifestError):
        Manifest.from_json(payload)


def test_mistyped_field_is_a_manifest_error():
    doc = manifest().to_dict()
    doc["files"] = [{"path": "model.onnx"}]
    with pytest.raises(ManifestError):
        Manifest.from_dict(doc)
