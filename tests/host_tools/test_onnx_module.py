"""The PyTorch reading of ONNX graphs that pruning recovery trains (host_tools/compress/torch/onnx_module.py):
each op computes what ONNX Runtime computes, a graph it would read differently is not trained, and
training that ends worse than it started gives the weights back."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from device_agent.errors import NotApplicable
from host_tools.compress import ModelFile, run_recipe
from tests.host_tools.test_compress import steps

torch = pytest.importorskip("torch")
from host_tools.compress.torch import onnx_ops  # noqa: E402
from host_tools.compress.torch.onnx_module import OnnxModule  # noqa: E402

F, I64, B = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL


def _i64(*values):
    return np.array(values, np.int64)


# op, attributes, inputs (arrays: graph inputs; ("c", array): initializers), the output's type
CASES = {
    "Abs": ("Abs", {}, [np.linspace(-2, 2, 12, dtype=np.float32).reshape(3, 4)], F),
    "Log": ("Log", {}, [np.linspace(0.1, 3, 12, dtype=np.float32).reshape(3, 4)], F),
    "Sin": ("Sin", {}, [np.linspace(-3, 3, 12, dtype=np.float32)], F),
    "Cos": ("Cos", {}, [np.linspace(-3, 3, 12, dtype=np.float32)], F),
    "Reciprocal": ("Reciprocal", {}, [np.linspace(0.5, 3, 6, dtype=np.float32)], F),
    "Floor": ("Floor", {}, [np.linspace(-2.5, 2.5, 7, dtype=np.float32)], F),
    "Min of three": ("Min", {}, [np.arange(6, dtype=np.float32), ("c", np.float32(2.5)),
                                 np.array([5, 4, 3, 2, 1, 0], np.float32)], F),
    "Max": ("Max", {}, [np.arange(6, dtype=np.float32).reshape(2, 3), ("c", np.array([1, 4, 0], np.float32))], F),
    "Mod (integer)": ("Mod", {}, [_i64(-7, -1, 5, 9), ("c", _i64(4))], I64),
    "Mod (fmod)": ("Mod", {"fmod": 1}, [np.array([-7.5, -1, 5, 9.25], np.float32), ("c", np.float32(4))], F),
    "Greater": ("Greater", {}, [np.arange(5, dtype=np.float32), ("c", np.float32(2))], B),
    "GreaterOrEqual": ("GreaterOrEqual", {}, [_i64(0, 1, 2, 3), ("c", _i64(2))], B),
    "Less": ("Less", {}, [_i64(0, 1, 2, 3), ("c", _i64(2))], B),
    "LessOrEqual": ("LessOrEqual", {}, [np.arange(4, dtype=np.float32), ("c", np.float32(2))], B),
    "And": ("And", {}, [np.array([True, True, False, False]), ("c", np.array([True, False, True, False]))], B),
    "Or": ("Or", {}, [np.array([True, True, False, False]), ("c", np.array([True, False, True, False]))], B),
    "Not": ("Not", {}, [np.array([True, False])], B),
    "IsNaN": ("IsNaN", {}, [np.array([0, np.nan, np.inf, -1], np.float32)], B),
    "IsInf": ("IsInf", {}, [np.array([0, np.nan, np.inf, -np.inf], np.float32)], B),
    "IsInf (negative only)": ("IsInf", {"detect_positive": 0}, [np.array([0, np.inf, -np.inf], np.float32)], B),
    "ConstantOfShape": ("ConstantOfShape", {"value": numpy_helper.from_array(np.array([-3], np.int64))},
                        [("c", _i64(2, 3))], I64),
    "ConstantOfShape (default)": ("ConstantOfShape", {}, [("c", _i64(4))], F),
    "Expand (both ways)": ("Expand", {}, [np.arange(3, dtype=np.float32).reshape(3, 1), ("c", _i64(2, 1, 4))], F),
    "GatherElements": ("GatherElements", {"axis": 1}, [np.arange(12, dtype=np.float32).reshape(3, 4),
                                                       ("c", _i64(0, -1, 2, 1, 1, 0).reshape(3, 2))], F),
    "CumSum": ("CumSum", {}, [np.arange(1, 7, dtype=np.float32).reshape(2, 3), ("c", _i64(1))], F),
    # what torch.export writes: a shape's pieces read with start/end, an attention mask gathered per position
    "Shape (start, end)": ("Shape", {"start": 1, "end": -1}, [np.zeros((2, 3, 4, 5), np.float32)], I64),
    "Shape (start only)": ("Shape", {"start": -2}, [np.zeros((2, 3, 4, 5), np.float32)], I64),
    "GatherND": ("GatherND", {}, [np.arange(24, dtype=np.float32).reshape(2, 3, 4),
                                  ("c", _i64(0, 2, 1, -1, 1, 0).reshape(3, 2))], F),
    "GatherND (batch_dims 1)": ("GatherND", {"batch_dims": 1}, [np.arange(24, dtype=np.float32).reshape(2, 3, 4),
                                                                ("c", _i64(2, 0, 1, 1).reshape(2, 2, 1))], F),
    "ReduceL2": ("ReduceL2", {"keepdims": 0}, [np.linspace(-2, 2, 12, dtype=np.float32).reshape(3, 4),
                                               ("c", _i64(1))], F),
    "CumSum (exclusive, reverse)": ("CumSum", {"exclusive": 1, "reverse": 1},
                                    [_i64(1, 2, 3, 4).reshape(1, 4), ("c", np.array(-1, np.int64))], I64),
    "Pad (constant, some axes)": ("Pad", {}, [np.ones((1, 2, 3, 3), np.float32), ("c", _i64(0, 1, 2, 0, 0, 1)),
                                             ("c", np.float32(-1)), ("c", _i64(1, 2, 3))], F),
    "Pad (constant, cropping)": ("Pad", {}, [np.arange(20, dtype=np.float32).reshape(4, 5), ("c", _i64(1, -1, 0, 2))],
                                 F),
    "Pad (edge)": ("Pad", {"mode": "edge"}, [np.arange(18, dtype=np.float32).reshape(1, 2, 3, 3),
                                             ("c", _i64(0, 0, 1, 2, 0, 0, 2, 1))], F),
    "Pad (reflect)": ("Pad", {"mode": "reflect"}, [np.arange(10, dtype=np.float32).reshape(1, 2, 5),
                                                   ("c", _i64(0, 0, 2, 0, 0, 1))], F),
    "InstanceNormalization": ("InstanceNormalization", {"epsilon": 1e-5},
                              [np.random.default_rng(0).standard_normal((2, 3, 5)).astype(np.float32),
                               ("c", np.array([1, 2, 0.5], np.float32)), ("c", np.array([0, 1, -1], np.float32))], F),
    **{op: (op, {}, [np.linspace(-5, 5, 21, dtype=np.float32)], F)
       for op in ("HardSigmoid", "HardSwish", "Elu", "Selu", "Softplus", "Softsign", "Mish", "Celu",
                  "ThresholdedRelu")},
    "HardSigmoid (own constants)": ("HardSigmoid", {"alpha": 0.3, "beta": 0.4},
                                    [np.linspace(-5, 5, 21, dtype=np.float32)], F),
    "Elu (own alpha)": ("Elu", {"alpha": 0.5}, [np.linspace(-5, 5, 21, dtype=np.float32)], F),
    "Selu (own constants)": ("Selu", {"alpha": 1.5, "gamma": 1.1}, [np.linspace(-5, 5, 21, dtype=np.float32)], F),
    # EfficientNet's "same" padding, as exporters may write it: the odd pixel at the end (UPPER) or start
    **{f"Conv ({mode}, stride {stride}, kernel {k})": (
        "Conv", {"auto_pad": mode, "strides": [stride, stride]},
        [np.random.default_rng(1).standard_normal((1, 2, 7, 6)).astype(np.float32),
         ("c", np.random.default_rng(2).standard_normal((3, 2, k, k)).astype(np.float32))], F)
       for mode, stride, k in (("SAME_UPPER", 2, 3), ("SAME_LOWER", 2, 4), ("SAME_UPPER", 1, 4), ("VALID", 2, 3))},
    # a U-Net's upsampling: stride 2 (pads, output_padding as torch.onnx.export writes them), pads that
    # differ, groups (weight [in, out / groups, k, k])
    **{f"ConvTranspose ({name})": (
        "ConvTranspose", attrs,
        [np.random.default_rng(1).standard_normal((1, 4, 5, 6)).astype(np.float32),
         ("c", np.random.default_rng(2).standard_normal((4, outs, 3, 3)).astype(np.float32)),
         ("c", np.linspace(-1, 2, outs * attrs.get("group", 1), dtype=np.float32))], F)
       for name, attrs, outs in (("stride 2", {"strides": [2, 2]}, 3),
                                 ("stride 2, pads, output_padding", {"strides": [2, 2], "pads": [1, 1, 1, 1],
                                                                     "output_padding": [1, 1]}, 3),
                                 ("pads that differ, dilation", {"pads": [0, 2, 1, 0], "dilations": [2, 1]}, 3),
                                 ("2 groups", {"group": 2, "strides": [2, 1]}, 2))},
    # string attributes (read as str): Resize's mode and coordinate transformation
    "Resize (nearest, asymmetric)": ("Resize", {"mode": "nearest", "coordinate_transformation_mode": "asymmetric"},
                                     [np.arange(6, dtype=np.float32).reshape(1, 1, 2, 3),
                                      ("c", np.array([], np.float32)), ("c", np.array([1, 1, 2, 2], np.float32))], F),
    "Resize (linear, half pixel)": ("Resize", {"mode": "linear", "coordinate_transformation_mode": "half_pixel"},
                                    [np.arange(6, dtype=np.float32).reshape(1, 1, 2, 3),
                                     ("c", np.array([], np.float32)), ("c", np.array([1, 1, 2, 2], np.float32))], F),
    "Slice (backwards)": ("Slice", {}, [np.arange(24, dtype=np.float32).reshape(2, 12), ("c", _i64(-1, 10)),
                                        ("c", _i64(-9223372036854775807, 1)), ("c", _i64(1, 0)), ("c", _i64(-1, -3))],
                          F),
}


def _graph(op, attrs, operands, out_type):
    inputs, inits, names = [], [], []
    for i, operand in enumerate(operands):
        name = f"in{i}"
        names.append(name)
        if isinstance(operand, tuple):
            inits.append(numpy_helper.from_array(np.asarray(operand[1]), name))
        else:
            inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(operand.dtype),
                                                        list(operand.shape)))
    graph = helper.make_graph([helper.make_node(op, names, ["out"], **attrs)], "g", inputs,
                              [helper.make_tensor_value_info("out", out_type, None)], inits)
    return helper.make_model_gen_version(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("case", list(CASES))
def test_each_op_reads_as_onnx_runtime_runs_it(case):
    op, attrs, operands, out_type = CASES[case]
    model = _graph(op, attrs, operands, out_type)
    feeds = {f"in{i}": v for i, v in enumerate(operands) if not isinstance(v, tuple)}
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    module = OnnxModule(model)
    with torch.no_grad():
        (got,) = module(*[torch.from_numpy(feeds[name]) for name in module.input_names])
    assert got.numpy().dtype == want.dtype and got.shape == want.shape
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


def test_a_graph_with_an_op_it_cannot_read_is_refused_by_name():
    model = _graph("Einsum", {"equation": "ij->ji"}, [np.ones((2, 3), np.float32)], F)
    with pytest.raises(NotApplicable, match="fine-tuning cannot run op.s. Einsum in PyTorch"):
        OnnxModule(model)


def test_a_pruned_graph_read_differently_from_onnx_runtime_is_not_trained(tmp_path, monkeypatch):
    """Recovery trains the PyTorch reading and writes its weights back into the ONNX graph: if an op
    were read wrongly, that would train another model than the one shipped. It checks first."""
    from tests.host_tools import graphs

    model = ModelFile.open(graphs.mlp_with_constant_weights(tmp_path / "mlp.onnx"))
    data = {"x": np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32)}
    np.savez(tmp_path / "train.npz", **data)
    recipe = steps([("onnx-prune-channels", {"ratio": 0.5, "recover_epochs": 1})])
    report = run_recipe(model, recipe, calib=str(tmp_path / "train.npz"), latency_runs=5, workdir=tmp_path / "ok")
    assert report.steps[0].status == "ok", report.steps[0].note
    monkeypatch.setitem(onnx_ops.OPS, "Relu", lambda a, at: torch.abs(a[0]))  # a wrong reading of Relu
    report = run_recipe(model, recipe, calib=str(tmp_path / "train.npz"), latency_runs=5, workdir=tmp_path / "bad",
                        isolated=False)  # (the pass runs in this process, where OPS is patched)
    assert report.steps[0].status == "failed"
    assert "reads mlp.channels50.onnx differently from ONNX Runtime" in report.steps[0].note


def test_a_pruned_cell_whose_state_is_batched_along_its_second_axis_is_recovered(tmp_path):
    """An RNN's state [layers, batch, width], as torch.onnx.export writes it, is stored samples first
    like every input; recovery gives it to the PyTorch reading where the graph holds its batch and
    takes the next state back the same way, so the check against ONNX Runtime and the training see
    the same model the device runs."""
    from tests.host_tools import graphs

    model = ModelFile.open(graphs.stateful_cell(tmp_path / "cell.onnx"))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "train.npz", x=rng.standard_normal((48, 64)).astype(np.float32),
             state=rng.standard_normal((48, 2, 8)).astype(np.float32))
    cosines = []
    for epochs in (0, 20):
        report = run_recipe(model, steps([("onnx-prune-channels", {"ratio": 0.5, "recover_epochs": epochs})]),
                            calib=str(tmp_path / "train.npz"), eval_data=str(tmp_path / "train.npz"),
                            latency_runs=5, workdir=tmp_path / str(epochs))
        assert report.steps[0].status == "ok", report.steps[0].note
        assert report.result.outputs["next_state"].shape == (48, 2, 8)
        cosines.append(report.result.fidelity.cosine)
    assert cosines[1] > cosines[0] + 0.05, cosines  # recovered towards the unpruned cell


def test_training_that_ends_worse_than_it_started_gives_the_weights_back():
    """Recovery fine-tunes a pruned model on a few inputs; where that moves it away from its teacher
    (here: a learning rate far too high), the weights it started from are kept."""
    from host_tools.compress.torch.trainer import Schedule, distill

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 8)).astype(np.float32)
    teacher = torch.nn.Linear(8, 4)
    with torch.no_grad():
        targets = teacher(torch.from_numpy(x)).numpy() * 3
    student = torch.nn.Linear(8, 4)
    with torch.no_grad():
        student.weight.copy_(teacher.weight * 3 + 0.01)
        student.bias.copy_(teacher.bias * 3)
    start = [p.detach().clone() for p in student.parameters()]
    distill(student, [x], [targets], None, Schedule(epochs=3, lr=50.0), "onnx")
    assert all(torch.equal(p, q) for p, q in zip(student.parameters(), start))
    with torch.no_grad():  # from further away, the same training helps: its weights are kept
        student.weight.add_(torch.randn_like(student.weight) * 0.5)
    start = [p.detach().clone() for p in student.parameters()]
    distill(student, [x], [targets], None, Schedule(epochs=30, lr=1e-2), "onnx")
    assert not all(torch.equal(p, q) for p, q in zip(student.parameters(), start))


@pytest.mark.parametrize("named_like_the_copies", [False, True])
def test_a_constant_that_is_a_batch_norms_bias_and_anothers_running_mean_trains_only_as_the_bias(
        named_like_the_copies):
    """torch.export stores equal constants once: fresh BatchNorms share one zeros vector as bias and
    running mean, one ones vector as scale and running variance. Training must move the bias and
    scale and leave the statistics as they were (PyTorch refused to train at all: a running mean
    that requires grad). The fixed copies get names no other value of the graph has."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1)).astype(np.float32), "w"),
             numpy_helper.from_array(np.zeros(4, np.float32), "zeros"),
             numpy_helper.from_array(np.ones(4, np.float32), "ones")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("BatchNormalization", ["c", "ones", "zeros", "zeros", "ones"], ["y"])]
    if named_like_the_copies:  # values already called what a plain ".fixed" suffix would give
        nodes[0].output[0] = "zeros.fixed"
        nodes[1].input[0] = "zeros.fixed"
        inits.append(numpy_helper.from_array(np.full(4, 5, np.float32), "ones.fixed"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, ["n", 4, 3, 3])],
                              [helper.make_tensor_value_info("y", F, ["n", 4, 3, 3])], inits)
    proto = helper.make_model_gen_version(graph, opset_imports=[helper.make_opsetid("", 18)])
    module = OnnxModule(proto)
    x = torch.from_numpy(rng.standard_normal((8, 4, 3, 3)).astype(np.float32))
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    (module(x)[0] - 1).pow(2).mean().backward()
    optimizer.step()
    module.write_back(proto)
    bn = proto.graph.node[1]
    values = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    assert not np.allclose(values[bn.input[1]], 1) and not np.allclose(values[bn.input[2]], 0)  # scale, bias trained
    assert np.array_equal(values[bn.input[3]], np.zeros(4)) and np.array_equal(values[bn.input[4]], np.ones(4))
    names = [i.name for i in proto.graph.initializer] + [o for n in proto.graph.node for o in n.output]
    assert len(names) == len(set(names))
