"""Dynamic int8 quantization of the reference model, checked against the original."""

import pytest

from device_agent.errors import ConfigError
from host_tools.compress import EvalData, evaluate_model, quantize_dynamic_int8
from tests.conftest import MODELS


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, reference_model):
    out = tmp_path_factory.mktemp("q") / "digits_cnn.int8.onnx"
    provenance = quantize_dynamic_int8(reference_model, out)
    return out, provenance


def test_int8_model_is_smaller_and_keeps_accuracy(quantized, reference_model):
    out, provenance = quantized
    data = EvalData.load(MODELS / "digits_heldout.npz")
    before, after = evaluate_model(reference_model, data, latency_runs=20), evaluate_model(out, data, latency_runs=20)
    assert after.size_bytes < 0.35 * before.size_bytes
    assert before.accuracy > 0.95
    assert after.accuracy >= before.accuracy - 0.01
    assert (after.predictions == before.predictions).mean() > 0.98
    assert before.latency_p50_ms > 0 and after.latency_p50_ms > 0
    assert provenance["method"] == "onnx-dynamic-int8"


def test_missing_model_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        quantize_dynamic_int8(tmp_path / "nope.onnx", tmp_path / "out.onnx")


def test_eval_data_without_x_is_refused(tmp_path):
    import numpy as np
    np.savez(tmp_path / "bad.npz", inputs=np.zeros(3))
    with pytest.raises(ConfigError, match="'x'"):
        EvalData.load(tmp_path / "bad.npz")
