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
