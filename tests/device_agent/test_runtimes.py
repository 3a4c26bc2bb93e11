"""Both runtimes behind one interface, on models nobody here made and on every input kind a
device meets: several inputs and outputs, dynamic dimensions, int64/uint8/int8, state inputs."""

import os
import re
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper, TensorProto

from device_agent.errors import ModelError
from device_agent.runtime import RuntimeOptions, load_runtime
from device_agent.runtime.onnx import choose_providers
from device_agent.runtime.tflite import find_interpreter
from tests.conftest import FIXTURES, MODELS


ONNX_TEST_DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"


def shipped_case(relative: str):
    """A model the onnx package ships with its recorded inputs and expected outputs."""
    case = ONNX_TEST_DATA / relative
    model = onnx.load(str(case / "model.onnx"))
    data = case / "test_data_set_0"
    load = lambda p: numpy_helper.to_array(onnx.load_tensor(str(p)))  # noqa: E731
    inputs = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    feeds = {name: load(data / f"input_{i}.pb") for i, name in enumerate(inputs)}
    outputs = [load(p) for p in sorted(data.glob("output_*.pb"))]
    return case / "model.onnx", feeds, outputs


@pytest.mark.parametrize("case", [
    "pytorch-converted/test_Embedding",                     # int64 input
    "pytorch-operator/test_operator_symbolic_override_nested",  # three inputs, three outputs
    "pytorch-operator/test_operator_chunk",                 # one input, two outputs
    "pytorch-converted/test_Conv2d",                        # a conv layer with its weights
    "simple/test_expand_shape_model1",                      # float + int64 shape input
])
def test_onnx_runtime_reproduces_the_outputs_shipped_with_third_party_models(case):
    path, feeds, expected = shipped_case(case)
    runtime = load_runtime("onnxruntime", path)
    assert [s.name for s in runtime.inputs] == list(feeds)
    got = runtime.run(feeds)
    assert len(got) == len(expected)
    for have, want in zip(got.values(), expected):
        np.testing.assert_allclose(have, want, rtol=1e-4, atol=1e-5)


def test_a_real_architecture_shipped_by_onnx_loads_and_runs():
    runtime = load_runtime("onnxruntime", ONNX_TEST_DATA / "light" / "light_resnet50.onnx")
    (spec,) = runtime.inputs
    out = runtime.run({spec.name: np.random.default_rng(0).random(spec.shape, dtype=np.float32)})
    assert next(iter(out.values())).shape == (1, 1000)


def test_dynamic_dimensions_follow_the_input_given():
    path, _, _ = shipped_case("simple/test_sequence_model8")  # X: ['n'], Splits: int64[3] -> len
    runtime = load_runtime("onnxruntime", path)
    assert runtime.inputs[0].shape == ("n",)
    for n in (6, 9):
        out = runtime.run({"X": np.arange(n, dtype=np.float32), "Splits": np.array([1, 2, n - 3], dtype=np.int64)})
        assert out["len"].tolist() == 3


def test_a_call_that_fails_is_one_model_error_without_onnx_runtimes_own_log(tmp_path, capfd):
    """A Reshape to a fixed [1, 4] given two samples: ONNX Runtime's message is in the ModelError, and
    it does not print its own log of the failure (two coloured lines on stderr per call) as well."""
    shape = numpy_helper.from_array(np.array([1, 4], np.int64), "shape")
    model = _graph_model([helper.make_node("Reshape", ["x", "shape"], ["y"])],
                         [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 2])],
                         [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [shape])
    onnx.save(model, tmp_path / "m.onnx")
    runtime = load_runtime("onnxruntime", tmp_path / "m.onnx")
    assert runtime.run({"x": np.ones((1, 2, 2), np.float32)})["y"].shape == (1, 4)
    capfd.readouterr()
    with pytest.raises(ModelError, match="inference failed: .*Reshape"):
        runtime.run({"x": np.ones((2, 2, 2), np.float32)})
    assert capfd.readouterr().err == ""


def _graph_model(nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model_gen_version(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("dtype, onnx_type", [(np.uint8, TensorProto.UINT8), (np.int8, TensorProto.INT8)])
def test_integer_image_inputs_are_taken_as_they_are(tmp_path, dtype, onnx_type):
    # DequantizeLinear: the usual front of a model fed raw camera bytes
    x = helper.make_tensor_value_info("pixels", onnx_type, ["batch", 4])
    y = helper.make_tensor_value_info("value", TensorProto.FLOAT, ["batch", 4])
    scale = numpy_helper.from_array(np.array(0.5, dtype=np.float32), "scale")
    zero = numpy_helper.from_array(np.array(2, dtype=dtype), "zero")
    path = tmp_path / "dq.onnx"
    onnx.save(_graph_model([helper.make_node("DequantizeLinear", ["pixels", "scale", "zero"], ["value"])],
                           [x], [y], [scale, zero]), str(path))
    runtime = load_runtime("onnxruntime", path)
    assert runtime.inputs[0].dtype == np.dtype(dtype).name
    pixels = np.array([[2, 4, 6, 12]], dtype=dtype)
    np.testing.assert_allclose(runtime.run({"pixels": pixels})["value"], [[0, 1, 2, 5]])


def test_a_model_with_state_inputs_carries_its_state_across_calls(tmp_path):
    # A streaming GRU: the hidden state comes back out and is fed into the next call.
    hidden, features = 3, 2
    rng = np.random.default_rng(0)
    W = numpy_helper.from_array(rng.random((1, 3 * hidden, features), dtype=np.float32), "W")
    R = numpy_helper.from_array(rng.random((1, 3 * hidden, hidden), dtype=np.float32), "R")
    node = helper.make_node("GRU", ["x", "W", "R", "", "", "h_in"], ["", "h_out"], hidden_size=hidden)
    model = _graph_model([node],
                         [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["time", 1, features]),
                          helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [1, 1, hidden])],
                         [helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [1, 1, hidden])], [W, R])
    path = tmp_path / "gru.onnx"
    onnx.save(model, str(path))
    runtime = load_runtime("onnxruntime", path)
    x = rng.random((4, 1, features), dtype=np.float32)
    whole = runtime.run({"x": x, "h_in": np.zeros((1, 1, hidden), np.float32)})["h_out"]
    state = np.zeros((1, 1, hidden), np.float32)
    for step in range(4):  # one step at a time, state carried by the caller
        state = runtime.run({"x": x[step:step + 1], "h_in": state})["h_out"]
    np.testing.assert_allclose(state, whole, rtol=1e-5)


def test_tflite_runs_the_converted_reference_model_like_onnx_does(heldout):
    tflite = load_runtime("tflite", MODELS / "digits_cnn.tflite", RuntimeOptions(threads=1))
    reference = load_runtime("onnxruntime", MODELS / "digits_cnn.onnx")
    (spec,) = tflite.inputs
    assert spec.shape == (1, 1, 8, 8) and spec.dtype == "float32"
    x, y = heldout
    agree = 0
    for sample in x[:50]:
        a = next(iter(tflite.run({spec.name: sample[None]}).values()))
        b = reference.run({"image": sample[None]})["logits"]
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
        agree += int(a.argmax() == b.argmax())
    assert agree == 50


def test_tflite_follows_a_free_batch_axis_from_call_to_call():
    """keras_cnn.tflite takes [N, 32, 32, 3]: a call of three samples resizes the interpreter and
    gives what three single-sample calls give; single-sample calls work again after it."""
    runtime = load_runtime("tflite", FIXTURES / "keras_cnn.tflite", RuntimeOptions(threads=1))
    (spec,) = runtime.inputs
    assert spec.shape == ("?", 32, 32, 3)
    x = np.random.default_rng(0).random((3, 32, 32, 3), dtype=np.float32)
    singles = [next(iter(runtime.run({spec.name: x[i:i + 1]}).values())) for i in range(3)]
    batch = next(iter(runtime.run({spec.name: x}).values()))
    assert batch.shape == (3, 5)
    np.testing.assert_allclose(batch, np.concatenate(singles), rtol=1e-5, atol=1e-6)
    again = next(iter(runtime.run({spec.name: x[2:]}).values()))
    np.testing.assert_allclose(again, singles[2], rtol=1e-5, atol=1e-6)


def test_a_fused_tflite_lstm_answers_each_call_as_if_it_were_the_first():
    """TensorFlow's converter fuses a Keras 2 LSTM into UNIDIRECTIONAL_SEQUENCE_LSTM, whose state is a
    variable tensor the interpreter keeps from one call to the next: the same input gave another
    answer after another call, and a keyword spotter made so scored at chance (13 % on ten digits;
    95 % with each call alone). Every call now starts from the zero state the model was trained from."""
    path = FIXTURES / "keras2_lstm.tflite"
    runtime = load_runtime("tflite", path, RuntimeOptions(threads=1))
    (spec,) = runtime.inputs
    a, b = np.random.default_rng(0).random((2, 1, 8, 8), dtype=np.float32)
    first = next(iter(runtime.run({spec.name: a}).values()))
    runtime.run({spec.name: b})
    np.testing.assert_array_equal(next(iter(runtime.run({spec.name: a}).values())), first)
    fresh = find_interpreter()[0](model_path=str(path), num_threads=1)  # the first call of a new interpreter
    fresh.allocate_tensors()
    fresh.set_tensor(fresh.get_input_details()[0]["index"], a)
    fresh.invoke()
    np.testing.assert_allclose(first, fresh.get_tensor(fresh.get_output_details()[0]["index"]), rtol=1e-6)


def test_a_tflite_call_at_a_shape_the_model_cannot_take_names_it_and_the_next_call_still_works():
    """TFLite resizes an input to whatever a call brings, fixed dimensions too; a fused LSTM
    converted for one sample then fails in C++ terms, and the interpreter stayed at the failed shape:
    every later call, of the right shape too, failed ("Dimension mismatch. Got 1 but expected 200"),
    so one bad request to the agent's local API broke the model for every client until a restart."""
    runtime = load_runtime("tflite", FIXTURES / "keras2_lstm.tflite", RuntimeOptions(threads=1))
    (spec,) = runtime.inputs
    x = np.random.default_rng(0).random((200, 8, 8), dtype=np.float32)
    first = next(iter(runtime.run({spec.name: x[:1]}).values()))
    with pytest.raises(ModelError) as failed:
        runtime.run({spec.name: x})
    said = f"inference failed: input {spec.name!r} is [200, 8, 8], the model takes [1, 8, 8] and does not run at " \
           "that shape (Node number "
    assert re.fullmatch(re.escape(said) + r"\d \(UNIDIRECTIONAL_SEQUENCE_LSTM\) failed to prepare\)",
                        str(failed.value)), str(failed.value)
    np.testing.assert_array_equal(next(iter(runtime.run({spec.name: x[:1]}).values())), first)


def test_loading_a_tflite_model_prints_no_delegate_banner_but_passes_other_lines_on(monkeypatch, capfd):
    """TFLite's C++ writes "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." to stderr when a
    process's first interpreter allocates its tensors, with no setting to turn it off: it stood at the
    top of every `edgefleet compress` of a TFLite model and in the agent's journal at each start. A
    fresh process loads and runs a model and writes nothing to stderr; anything else C++ writes
    while the interpreter is built still reaches stderr."""
    import subprocess
    import sys

    from device_agent.runtime import tflite

    script = ("import numpy as np; from pathlib import Path; from device_agent.runtime import load_runtime; "
              f"r = load_runtime('tflite', Path({str(MODELS / 'digits_cnn.tflite')!r})); "
              "r.run({r.inputs[0].name: np.zeros((1, 1, 8, 8), np.float32)}); print('ran')")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).parents[2])
    assert done.stdout == "ran\n" and done.stderr == "", done.stderr
    monkeypatch.setattr(tflite, "_banner_due", True)
    with tflite._without_delegate_banner():
        os.write(2, tflite._BANNER + b"\nERROR: a kernel's own complaint\n")
    assert capfd.readouterr().err == "ERROR: a kernel's own complaint\n"


def test_tflite_outputs_are_the_callers_to_keep_and_a_missing_input_is_named():
    runtime = load_runtime("tflite", FIXTURES / "streaming_kws.tflite", RuntimeOptions(threads=1))
    audio, state = runtime.inputs
    rng = np.random.default_rng(1)
    feeds = {audio.name: rng.random((1, 10, 20), dtype=np.float32), state.name: np.zeros((1, 1, 48), np.float32)}
    first = runtime.run(feeds)
    kept = {name: value.copy() for name, value in first.items()}
    state_out = runtime.outputs[1].name  # the state, fed back in
    runtime.run({audio.name: rng.random((1, 10, 20), dtype=np.float32), state.name: kept[state_out]})
    for name, value in first.items():  # the next call did not write into the arrays handed back
        np.testing.assert_array_equal(value, kept[name])
    with pytest.raises(ModelError, match=f"missing input\\(s\\) {state.name}$"):
        runtime.run({audio.name: feeds[audio.name]})


@pytest.mark.parametrize("dtype, zero_point", [(np.int8, -128), (np.int8, 3), (np.uint8, 128)])
def test_tflite_int8_inputs_and_outputs_convert_at_the_edge_as_the_formula_says(dtype, zero_point):
    """A full-int8 model's tensors are fed and read as float: q = clamp(round_half_even(x / scale) + zp),
    x = (q - zp) * scale, in float32, with ties, both ends of the range and beyond them."""
    from device_agent.runtime.tflite import _Port
    scale = float(np.float32(0.0392))  # TFLite keeps scales as float32
    port = _Port({"name": "x", "index": 0, "dtype": dtype, "shape": np.array([1, 9]),
                  "quantization": (scale, zero_point)})
    info = np.iinfo(dtype)
    steps = np.array([-400.5, -2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 126.5, 400.0])
    x = (steps * scale).astype(np.float32).reshape(1, 9)
    want = np.clip(np.round(x / scale) + zero_point, info.min, info.max).astype(dtype)
    got = port.quantize(x)
    assert got.dtype == dtype and np.array_equal(got, want)
    assert got.min() == max(info.min, -400 + zero_point) and got.max() == info.max  # clamped, not wrapped
    q = np.arange(info.min, info.max + 1, dtype=dtype)
    real = port.dequantize(q)
    assert real.dtype == np.float32
    np.testing.assert_array_equal(real, ((q.astype(np.float32) - zero_point) * np.float32(scale)))


def test_tflite_package_is_found_in_the_documented_order():
    _, package = find_interpreter()
    assert package == "ai_edge_litert"  # installed by the test extra; tflite_runtime would come next


def test_tflite_refuses_wrong_dtypes_with_a_clear_error():
    runtime = load_runtime("tflite", MODELS / "digits_cnn.tflite")
    with pytest.raises(ModelError, match="is float64, the model takes float32"):
        runtime.run({runtime.inputs[0].name: np.zeros((1, 1, 8, 8))})


def test_a_file_that_is_not_a_tflite_model_does_not_load(tmp_path):
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"not a flatbuffer" * 10)
    with pytest.raises(ModelError, match="TFLite cannot load bad.tflite"):
        load_runtime("tflite", bad)


def test_a_model_that_needs_tensorflows_select_ops_is_refused_naming_them():
    """Converted with SELECT_TF_OPS, a model holds Flex ops that no TFLite package a device installs
    runs. The interpreter's own words ran a paragraph about Android's Flex dependency into "Node
    number 3 (FlexMatrixDeterminant) failed to prepare"; the refusal names the op and the way out,
    in one line (bundle build and compress --eval refuse with it too)."""
    with pytest.raises(ModelError) as refused:
        load_runtime("tflite", FIXTURES / "keras_select_ops.tflite")
    assert str(refused.value) == (
        "TFLite cannot load keras_select_ops.tflite: it uses TensorFlow ops that TFLite runs only with the Flex "
        "delegate, which this TFLite package lacks (MatrixDeterminant): convert the model with TFLITE_BUILTINS alone")


@pytest.mark.parametrize("available, override, chosen", [
    (["CPUExecutionProvider"], (), ("CPUExecutionProvider",)),
    (["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], (),
     ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")),
    (["CUDAExecutionProvider", "AzureExecutionProvider", "CPUExecutionProvider"], (),
     ("CUDAExecutionProvider", "CPUExecutionProvider")),
    (["CUDAExecutionProvider", "CPUExecutionProvider"], ("CPUExecutionProvider",), ("CPUExecutionProvider",)),
])
def test_execution_providers_come_from_what_the_device_has_unless_overridden(available, override, chosen):
    assert choose_providers(available, override) == chosen


def test_an_override_naming_a_missing_provider_is_refused():
    with pytest.raises(ModelError, match="CUDAExecutionProvider not available"):
        choose_providers(["CPUExecutionProvider"], ("CUDAExecutionProvider",))


def test_the_session_uses_the_providers_chosen(reference_model):
    runtime = load_runtime("onnxruntime", reference_model)
    assert runtime.providers == ("CPUExecutionProvider",)


def test_a_failed_call_gives_onnx_runtimes_reason_and_the_next_call_still_works(reference_model, heldout):
    runtime = load_runtime("onnxruntime", reference_model)
    with pytest.raises(ModelError, match=r"inference failed: .*(Invalid rank|Got invalid dimensions)"):
        runtime.run({"image": np.zeros((1, 8, 8), np.float32)})
    # which dimension is wrong, which ONNX Runtime says only after its first line; without its error code
    with pytest.raises(ModelError) as wrong:
        runtime.run({"image": np.zeros((1, 2, 8, 8), np.float32)})
    assert str(wrong.value) == ("inference failed: Got invalid dimensions for input: image for the following "
                                "indices: index: 1 Got: 2 Expected: 1")
    with pytest.raises(ModelError, match=r"inference failed: .*image"):
        runtime.run({"pixels": heldout[0][:1]})
    import onnxruntime as ort
    want = ort.InferenceSession(str(reference_model)).run(None, {"image": heldout[0][:4]})[0]
    np.testing.assert_allclose(runtime.run({"image": heldout[0][:4]})["logits"], want, rtol=1e-5)


def test_a_session_the_public_run_rebuilt_is_the_one_called_next(reference_model, heldout):
    """ONNX Runtime's provider fallback replaces the session's C++ half inside the public run;
    the next call must go to the new one, not fail again on the old."""
    runtime = load_runtime("onnxruntime", reference_model)
    calls = []

    def broken(*args):
        calls.append("broken")
        raise RuntimeError("EP failure")

    runtime._direct_run = broken
    first = runtime.run({"image": heldout[0][:2]})
    second = runtime.run({"image": heldout[0][:2]})
    assert calls == ["broken"]
    np.testing.assert_array_equal(first["logits"], second["logits"])


def test_calls_from_many_threads_at_once_each_get_the_answer_to_their_own_input(reference_model, heldout):
    """The agent's local API answers each request on a thread of its own, all on one session."""
    runtime = load_runtime("onnxruntime", reference_model)
    images = heldout[0][:64]
    import onnxruntime as ort
    want = ort.InferenceSession(str(reference_model)).run(None, {"image": images})[0]
    wrong = []

    def caller(offset):
        for k in range(300):
            i = (offset + k) % len(images)
            got = runtime.run({"image": images[i:i + 1]})["logits"][0]
            if not np.allclose(got, want[i], rtol=1e-4, atol=1e-5):
                wrong.append(i)

    threads = [threading.Thread(target=caller, args=(t * 7,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


def test_an_answer_stays_what_it_was_after_later_calls_and_after_the_input_changes(reference_model, heldout):
    runtime = load_runtime("onnxruntime", reference_model)
    image = heldout[0][:1].copy()
    first = runtime.run({"image": image})["logits"]
    kept = first.copy()
    image[:] = 0  # the caller reuses its buffer
    second = runtime.run({"image": heldout[0][5:6]})["logits"]
    np.testing.assert_array_equal(first, kept)
    assert not np.array_equal(first, second)
    non_contiguous = np.asfortranarray(heldout[0][:3])[1:2]
    np.testing.assert_allclose(runtime.run({"image": non_contiguous})["logits"],
                               runtime.run({"image": np.ascontiguousarray(non_contiguous)})["logits"], rtol=1e-6)


def test_a_model_whose_output_is_a_sequence_runs(tmp_path):
    """Classic-ML exports (scikit-learn's through skl2onnx) give sequences and maps."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    seq = helper.make_tensor_sequence_value_info("parts", TensorProto.FLOAT, None)
    total = helper.make_tensor_value_info("total", TensorProto.FLOAT, [1])
    nodes = [helper.make_node("SequenceConstruct", ["x", "x"], ["parts"]),
             helper.make_node("ReduceSum", ["x"], ["total"], keepdims=1)]
    path = tmp_path / "seq.onnx"
    onnx.save(_graph_model(nodes, [x], [seq, total]), path)
    runtime = load_runtime("onnxruntime", path)
    for _ in range(2):
        out = runtime.run({"x": np.array([1.0, 2.0], np.float32)})
        assert [list(p) for p in out["parts"]] == [[1.0, 2.0], [1.0, 2.0]]
        assert out["total"].tolist() == [3.0]
