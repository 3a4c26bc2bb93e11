"""ONNX graphs shaped like models nobody here made, built with onnx.helper for the compression tests:
weights arriving through Constant nodes, several inputs and outputs, int64 token ids, dynamic
axes, a recurrent layer with a state input. Weights are random but fixed (seeded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = [helper.make_opsetid("", 17)]
ML_OPSET = [*OPSET, helper.make_opsetid("ai.onnx.ml", 1)]  # (scikit-learn's ops, as skl2onnx writes them)


def save(graph, path: Path, opsets=OPSET) -> Path:
    model = helper.make_model_gen_version(graph, opset_imports=opsets, producer_name="edgefleet-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _const(name: str, array: np.ndarray):
    return helper.make_node("Constant", [], [name], name=f"{name}_const", value=numpy_helper.from_array(array, name))


def mlp_with_constant_weights(path: Path, features: int = 64, hidden: int = 128, classes: int = 8) -> Path:
    """x [batch, features] -> MatMul -> Add -> Relu -> MatMul -> Add -> logits [batch, classes],
    every weight a Constant node as some exporters write them."""
    rng = np.random.default_rng(1)
    w1 = (rng.standard_normal((features, hidden)) / np.sqrt(features)).astype(np.float32)
    w2 = (rng.standard_normal((hidden, classes)) / np.sqrt(hidden)).astype(np.float32)
    nodes = [
        _const("w1", w1), _const("b1", np.zeros(hidden, np.float32)),
        _const("w2", w2), _const("b2", np.zeros(classes, np.float32)),
        helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
        helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
        helper.make_node("MatMul", ["h2", "w2"], ["h3"], name="fc2"),
        helper.make_node("Add", ["h3", "b2"], ["logits"], name="fc2_bias"),
    ]
    graph = helper.make_graph(nodes, "mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])])
    return save(graph, path)


def text_encoder(path: Path, vocab: int = 100, dim: int = 32, classes: int = 4) -> Path:
    """Two inputs (int64 token ids, float mask, both [batch, tokens] with dynamic axes), an
    embedding Gather, a masked mean, a MatMul head; two outputs (logits and the pooled vector)."""
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(rng.standard_normal((vocab, dim)).astype(np.float32), "embedding"),
             numpy_helper.from_array((rng.standard_normal((dim, dim)) / np.sqrt(dim)).astype(np.float32), "proj"),
             numpy_helper.from_array((rng.standard_normal((dim, classes)) / np.sqrt(dim)).astype(np.float32), "head"),
             numpy_helper.from_array(np.array([2], np.int64), "axis2"),
             numpy_helper.from_array(np.array([1], np.int64), "axis1")]
    nodes = [
        helper.make_node("Gather", ["embedding", "ids"], ["emb"], name="embed"),
        helper.make_node("Unsqueeze", ["mask", "axis2"], ["mask3"], name="mask_unsqueeze"),
        helper.make_node("Mul", ["emb", "mask3"], ["masked"], name="apply_mask"),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["summed"], name="sum_tokens", keepdims=0),
        helper.make_node("ReduceSum", ["mask", "axis1"], ["count"], name="count_tokens", keepdims=1),
        helper.make_node("Div", ["summed", "count"], ["mean"], name="mean"),
        helper.make_node("MatMul", ["mean", "proj"], ["proj_out"], name="proj"),
        helper.make_node("Tanh", ["proj_out"], ["pooled"], name="tanh"),
        helper.make_node("MatMul", ["pooled", "head"], ["logits"], name="head"),
    ]
    graph = helper.make_graph(
        nodes, "text", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "tokens"]),
                        helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", "tokens"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes]),
         helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", dim])], inits)
    return save(graph, path)


def text_encoder_data(count: int, tokens: int = 12, vocab: int = 100) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    lengths = rng.integers(3, tokens + 1, count)
    mask = (np.arange(tokens)[None, :] < lengths[:, None]).astype(np.float32)
    return {"ids": rng.integers(0, vocab, (count, tokens)).astype(np.int64), "mask": mask}


def gru_with_state(path: Path, features: int = 16, hidden: int = 32, directions: int = 1) -> Path:
    """A speech-style recurrent layer: x [batch, time, features] and state h0 [directions, batch,
    hidden] in (the batch in its second axis, as torch.onnx.export names it); the sequence output
    [batch, time, directions * hidden] and the next state out."""
    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array((rng.standard_normal((directions, 3 * hidden, features)) * 0.2)
                                     .astype(np.float32), "W"),
             numpy_helper.from_array((rng.standard_normal((directions, 3 * hidden, hidden)) * 0.2)
                                     .astype(np.float32), "R"),
             numpy_helper.from_array(np.array([0, 0, directions * hidden], np.int64), "bt_shape")]
    nodes = [
        helper.make_node("Transpose", ["x"], ["x_tbf"], name="to_time_major", perm=[1, 0, 2]),
        helper.make_node("GRU", ["x_tbf", "W", "R", "", "", "h0"], ["y", "h_next"], name="gru", hidden_size=hidden,
                         direction="bidirectional" if directions == 2 else "forward"),
        helper.make_node("Transpose", ["y"], ["y_btdh"], name="to_batch_major", perm=[2, 0, 1, 3]),
        helper.make_node("Reshape", ["y_btdh", "bt_shape"], ["out"], name="join_directions"),
    ]
    graph = helper.make_graph(
        nodes, "gru", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "time", features]),
                       helper.make_tensor_value_info("h0", TensorProto.FLOAT, [directions, "batch", hidden])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", "time", directions * hidden]),
         helper.make_tensor_value_info("h_next", TensorProto.FLOAT, [directions, "batch", hidden])], inits)
    return save(graph, path)


def stateful_cell(path: Path, features: int = 64, hidden: int = 32, layers: int = 2, width: int = 8) -> Path:
    """A streaming cell, one step of a recurrent network: x [batch, features] and its state
    [layers, batch, width] in (the batch in its second axis, as torch.onnx.export writes an RNN's
    state); x -> Gemm -> Relu -> Gemm, plus the state read as [batch, layers * width], -> Tanh is the
    next state (out in the same layout), and a Gemm of it the scores [batch, 4]. The first layer's
    channels are the ones channel pruning can remove."""
    rng = np.random.default_rng(5)
    state = layers * width

    def weight(name, rows, cols):
        return numpy_helper.from_array((rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32), name)
    inits = [weight("w1", hidden, features), numpy_helper.from_array(np.zeros(hidden, np.float32), "b1"),
             weight("w2", state, hidden), numpy_helper.from_array(np.zeros(state, np.float32), "b2"),
             weight("w3", 4, state), numpy_helper.from_array(np.zeros(4, np.float32), "b3"),
             numpy_helper.from_array(np.array([0, state], np.int64), "flat"),
             numpy_helper.from_array(np.array([0, layers, width], np.int64), "split")]
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], name="fc1", transB=1),
        helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
        helper.make_node("Gemm", ["h2", "w2", "b2"], ["h3"], name="fc2", transB=1),
        helper.make_node("Transpose", ["state"], ["state_bl"], name="batch_first", perm=[1, 0, 2]),
        helper.make_node("Reshape", ["state_bl", "flat"], ["state_flat"], name="flatten_state"),
        helper.make_node("Add", ["h3", "state_flat"], ["h4"], name="recur"),
        helper.make_node("Tanh", ["h4"], ["h5"], name="tanh"),
        helper.make_node("Gemm", ["h5", "w3", "b3"], ["scores"], name="head", transB=1),
        helper.make_node("Reshape", ["h5", "split"], ["h6"], name="unflatten_state"),
        helper.make_node("Transpose", ["h6"], ["next_state"], name="layers_first", perm=[1, 0, 2]),
    ]
    graph = helper.make_graph(
        nodes, "cell", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features]),
                        helper.make_tensor_value_info("state", TensorProto.FLOAT, [layers, "batch", width])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("next_state", TensorProto.FLOAT, [layers, "batch", width])], inits)
    return save(graph, path)


def sliced_position_table(path: Path, dim: int = 16, positions: int = 32, classes: int = 4) -> Path:
    """As exporters write a transformer's positions: a [1, positions, dim] table sliced to the
    input's token count at run time (symbolic shape inference cannot tell that min(positions, tokens)
    is tokens, and gives up), and a ConstantOfShape whose shape is a Constant node."""
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(rng.standard_normal((1, positions, dim)).astype(np.float32), "positions"),
             numpy_helper.from_array((rng.standard_normal((dim, classes)) / np.sqrt(dim)).astype(np.float32), "head"),
             numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([1], np.int64), "one")]
    nodes = [
        helper.make_node("Shape", ["x"], ["x_shape"], name="shape"),
        helper.make_node("Gather", ["x_shape", "one"], ["tokens"], name="token_count"),
        helper.make_node("Slice", ["positions", "zero", "tokens", "one"], ["used"], name="positions_used"),
        helper.make_node("Add", ["x", "used"], ["h"], name="add_positions"),
        _const("scale_shape", np.array([1], np.int64)),
        helper.make_node("ConstantOfShape", ["scale_shape"], ["scale"], name="scale",
                         value=numpy_helper.from_array(np.array([0.5], np.float32))),
        helper.make_node("Mul", ["h", "scale"], ["scaled"], name="apply_scale"),
        helper.make_node("MatMul", ["scaled", "head"], ["per_token"], name="head"),
        helper.make_node("ReduceMean", ["per_token"], ["logits"], name="mean_tokens", axes=[1], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "positions", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "tokens", dim])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])], inits)
    return save(graph, path)


def _projections(rng, dim: int) -> list:
    """An attention layer's query, key, value and output weights (wq, wk, wv, wo), [dim, dim] each."""
    return [numpy_helper.from_array((rng.standard_normal((dim, dim)) / np.sqrt(dim)).astype(np.float32), name)
            for name in ("wq", "wk", "wv", "wo")]


def _token_positions(row: str, column: str) -> tuple[list, list]:
    """Initializers and nodes that number the tokens of x [batch, tokens, dim] at run time, as a row
    [1, tokens] named *row* and a column [tokens, 1] named *column*."""
    inits = [numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([1], np.int64), "one"),
             numpy_helper.from_array(np.array(0, np.int64), "start"),
             numpy_helper.from_array(np.array(1, np.int64), "step")]
    nodes = [helper.make_node("Shape", ["x"], ["x_shape"]),
             helper.make_node("Gather", ["x_shape", "one"], ["t1"], name="token_count"),
             helper.make_node("Squeeze", ["t1", "zero"], ["t"]),
             helper.make_node("Range", ["start", "t", "step"], ["pos"]),
             helper.make_node("Unsqueeze", ["pos", "zero"], [row]),
             helper.make_node("Unsqueeze", ["pos", "one"], [column])]
    return inits, nodes


def _attention(path: Path, name: str, before: list, on_scores: list, inits: list, dim: int) -> Path:
    """One attention layer over x [batch, tokens, dim] (weights from _projections): the nodes *before*,
    Q, K, V and the scores Q K^T, the nodes *on_scores* (from "scores" to what the Softmax reads: the
    last one's output), Softmax (named softmax), the mix of V and the output projection, y."""
    nodes = [*before,
             helper.make_node("MatMul", ["x", "wq"], ["q"], name="q"),
             helper.make_node("MatMul", ["x", "wk"], ["k"], name="k"),
             helper.make_node("MatMul", ["x", "wv"], ["v"], name="v"),
             helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["scores"], name="scores"),
             *on_scores,
             helper.make_node("Softmax", [on_scores[-1].output[0]], ["weights"], axis=-1, name="softmax"),
             helper.make_node("MatMul", ["weights", "v"], ["mixed"], name="mix"),
             helper.make_node("MatMul", ["mixed", "wo"], ["y"], name="out")]
    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "tokens", dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "tokens", dim])], inits)
    return save(graph, path)


def relative_position_attention(path: Path, dim: int = 16, buckets: int = 8) -> Path:
    """One attention layer with T5's relative-position bias: the bucket of each token pair comes
    from float arithmetic on integer distances (Cast, Div, Log, Mul, Cast back to int64, then
    Where/Min) and indexes a bias table. Log(0) on the diagonal is -inf, which Where discards."""
    rng = np.random.default_rng(6)
    position_inits, position_nodes = _token_positions("pos_row", "pos_col")
    inits = _projections(rng, dim) + position_inits
    inits += [numpy_helper.from_array(rng.standard_normal(buckets).astype(np.float32), "bias_table"),
              numpy_helper.from_array(np.array(2, np.int64), "exact"),
              numpy_helper.from_array(np.array(buckets - 1, np.int64), "last"),
              numpy_helper.from_array(np.array(2.0, np.float32), "exact_f"),
              numpy_helper.from_array(np.array(3.0, np.float32), "per_log")]
    nodes = [
        *position_nodes,
        helper.make_node("Sub", ["pos_row", "pos_col"], ["rel"]),
        helper.make_node("Abs", ["rel"], ["dist"]),
        helper.make_node("Cast", ["dist"], ["dist_f"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["dist_f", "exact_f"], ["ratio"], name="bucket_div"),
        helper.make_node("Log", ["ratio"], ["log_ratio"], name="bucket_log"),
        helper.make_node("Mul", ["log_ratio", "per_log"], ["scaled"], name="bucket_mul"),
        helper.make_node("Cast", ["scaled"], ["far_i"], to=TensorProto.INT64),
        helper.make_node("Add", ["far_i", "exact"], ["far"]),
        helper.make_node("Min", ["far", "last"], ["far_capped"]),
        helper.make_node("Less", ["dist", "exact"], ["near"]),
        helper.make_node("Where", ["near", "dist", "far_capped"], ["bucket"]),
        helper.make_node("Gather", ["bias_table", "bucket"], ["rel_bias"], name="bias_lookup"),
    ]
    return _attention(path, "relative", nodes, [helper.make_node("Add", ["scores", "rel_bias"], ["biased"],
                                                                 name="add_bias")], inits, dim)


def causal_attention(path: Path, dim: int = 16, hidden: float = -np.inf) -> Path:
    """One attention layer with a causal mask as GPT-2, Llama and Qwen2 export it: a Where between a
    Constant *hidden* and 0 over the token pairs (*hidden* where a token would look ahead), added to
    the scores before Softmax. The TorchScript exporter writes -inf; torch.export float32's lowest."""
    position_inits, position_nodes = _token_positions("key_pos", "query_pos")
    inits = _projections(np.random.default_rng(8), dim) + position_inits
    inits.append(numpy_helper.from_array(np.array(dim ** -0.5, np.float32), "scale"))
    nodes = [
        *position_nodes,
        helper.make_node("Greater", ["key_pos", "query_pos"], ["ahead"]),
        _const("hidden", np.array(hidden, np.float32)),
        _const("no_mask", np.array(0.0, np.float32)),
        helper.make_node("Where", ["ahead", "hidden", "no_mask"], ["mask"], name="causal_mask"),
    ]
    on_scores = [helper.make_node("Mul", ["scores", "scale"], ["scaled"], name="scale_scores"),
                 helper.make_node("Add", ["scaled", "mask"], ["masked"], name="add_mask")]
    return _attention(path, "causal", nodes, on_scores, inits, dim)


def gemm_mlp(path: Path, features: int = 64, hidden: int = 128, classes: int = 8) -> Path:
    """x [batch, features] -> Gemm (weight [hidden, features], transB=1, as torch exports a Linear) ->
    Relu -> Gemm (weight [hidden, classes], alpha and beta written out) -> logits [batch, classes]."""
    rng = np.random.default_rng(7)
    inits = [numpy_helper.from_array((rng.standard_normal((hidden, features)) / np.sqrt(features)).astype(np.float32),
                                     "w1"),
             numpy_helper.from_array(rng.standard_normal(hidden).astype(np.float32) * 0.1, "b1"),
             numpy_helper.from_array((rng.standard_normal((hidden, classes)) / np.sqrt(hidden)).astype(np.float32),
                                     "w2"),
             numpy_helper.from_array(rng.standard_normal(classes).astype(np.float32) * 0.1, "b2")]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["logits"], name="fc2", alpha=1.0, beta=1.0)]
    graph = helper.make_graph(nodes, "gemm_mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])], inits)
    return save(graph, path)


def branching_mlp(path: Path, features: int = 64, hidden: int = 128, classes: int = 8) -> Path:
    """x [batch, features] -> MatMul -> Relu -> If (the sum of x above 0) with a MatMul in each branch
    -> logits [batch, classes]: the branches read weights of the outer graph by name, as an exported
    model with data-dependent control flow does."""
    rng = np.random.default_rng(2)
    w1, w_then, w_else = ((rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)
                          for shape in ((features, hidden), (hidden, classes), (hidden, classes)))
    branch = {name: helper.make_graph([helper.make_node("MatMul", ["h", weight], [f"{name}_out"], name=name)],
                                      name, [], [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT,
                                                                               ["batch", classes])])
              for name, weight in (("then", "w_then"), ("else", "w_else"))}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
             helper.make_node("Relu", ["h0"], ["h"], name="relu"),
             helper.make_node("ReduceSum", ["x"], ["total"], name="total", keepdims=0),
             helper.make_node("Greater", ["total", "zero"], ["positive"], name="positive"),
             helper.make_node("If", ["positive"], ["logits"], name="branch", then_branch=branch["then"],
                              else_branch=branch["else"])]
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w_then, "w_then"),
             numpy_helper.from_array(w_else, "w_else"), numpy_helper.from_array(np.array(0, np.float32), "zero")]
    graph = helper.make_graph(nodes, "branching_mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])], inits)
    return save(graph, path)


def float16_branching(path: Path, features: int = 16, hidden: int = 32, classes: int = 4) -> Path:
    """A graph in float16 throughout, as a model published in float16 is: x [batch, features]
    float16 -> MatMul -> Relu -> times a ConstantOfShape of 0.5 -> If (the sum of x above 0): the then
    branch scales its MatMul by the largest of x (the outer graph's input, read by name), the else
    branch Casts its MatMul to float16 -> logits [batch, classes], float16, which a Softmax also reads
    -> probs, float16."""
    rng = np.random.default_rng(3)
    w1, w_then, w_else = ((rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float16)
                          for shape in ((features, hidden), (hidden, classes), (hidden, classes)))
    out = {name: [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT16, ["batch", classes])]
           for name in ("then", "else")}
    then = helper.make_graph([helper.make_node("MatMul", ["hh", "w_then"], ["t0"]),
                              helper.make_node("ReduceMax", ["x"], ["x_max"], axes=[1], keepdims=1),
                              helper.make_node("Mul", ["t0", "x_max"], ["then_out"])], "then", [], out["then"])
    other = helper.make_graph([helper.make_node("MatMul", ["hh", "w_else"], ["e0"]),
                               helper.make_node("Cast", ["e0"], ["else_out"], to=TensorProto.FLOAT16)],
                              "else", [], out["else"])
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
             helper.make_node("Relu", ["h0"], ["h"], name="relu"),
             helper.make_node("Shape", ["h"], ["h_shape"], name="shape"),
             helper.make_node("ConstantOfShape", ["h_shape"], ["halves"], name="halves",
                              value=helper.make_tensor("value", TensorProto.FLOAT16, [1], [0.5])),
             helper.make_node("Mul", ["h", "halves"], ["hh"], name="halved"),
             helper.make_node("ReduceSum", ["x"], ["total"], name="total", keepdims=0),
             helper.make_node("Greater", ["total", "zero"], ["positive"], name="positive"),
             helper.make_node("If", ["positive"], ["logits"], name="branch", then_branch=then, else_branch=other),
             helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1)]
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w_then, "w_then"),
             numpy_helper.from_array(w_else, "w_else"), numpy_helper.from_array(np.array(0, np.float16), "zero")]
    graph = helper.make_graph(nodes, "float16_branching",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["batch", features])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT16, ["batch", classes]),
                               helper.make_tensor_value_info("probs", TensorProto.FLOAT16, ["batch", classes])],
                              inits)
    return save(graph, path)


def sklearn_style_mlp(path: Path, features: int = 16, hidden: tuple[int, int] = (128, 64), classes: int = 3,
                      names: tuple[str, ...] = ()) -> Path:
    """x [batch, features] -> a StandardScaler, a PCA and an MLPClassifier as skl2onnx exports them:
    ai.onnx.ml's Scaler (an op ONNX's type inference does not type), the PCA's Sub of the mean and
    MatMul, a Cast to float, MatMul + Add + Relu twice, MatMul + Add + Softmax -> output_label (the
    ArgMax, int64 [batch]) and output_probability (a ZipMap: a sequence of {class: probability}
    maps, as scikit-learn's predict_proba rows). With *names* (a classifier trained on class names),
    the ZipMap's keys are those names and output_label is the name (an ArrayFeatureExtractor of the
    names by the ArgMax, string [batch])."""
    rng = np.random.default_rng(4)
    sizes = (features - 4, *hidden, classes)
    weights = [(rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32) for a, b in zip(sizes, sizes[1:])]
    biases = [(0.1 * rng.standard_normal(b)).astype(np.float32) for b in sizes[1:]]
    nodes = [helper.make_node("Scaler", ["x"], ["scaled"], domain="ai.onnx.ml", name="scaler",
                              offset=[0.5] * features, scale=[2.0] * features),
             helper.make_node("Sub", ["scaled", "mean"], ["centred"], name="pca_sub"),
             helper.make_node("MatMul", ["centred", "components"], ["projected"], name="pca_matmul"),
             helper.make_node("Cast", ["projected"], ["h0"], to=TensorProto.FLOAT, name="cast")]
    inits = [numpy_helper.from_array((0.1 * rng.standard_normal(features)).astype(np.float32), "mean"),
             numpy_helper.from_array(np.linalg.qr(rng.standard_normal((features, features)))[0][:, :features - 4]
                                     .astype(np.float32), "components")]
    for k, (w, b) in enumerate(zip(weights, biases)):
        inits += [numpy_helper.from_array(w, f"coefficient{k}"), numpy_helper.from_array(b, f"intercepts{k}")]
        nodes += [helper.make_node("MatMul", [f"h{k}", f"coefficient{k}"], [f"mul{k}"], name=f"matmul{k}"),
                  helper.make_node("Add", [f"mul{k}", f"intercepts{k}"], [f"add{k}"], name=f"add{k}")]
        last = k == len(weights) - 1
        nodes.append(helper.make_node("Softmax" if last else "Relu", [f"add{k}"], ["scores" if last else f"h{k + 1}"],
                                      name="softmax" if last else f"relu{k}", **({"axis": 1} if last else {})))
    key, label = (TensorProto.STRING, TensorProto.STRING) if names else (TensorProto.INT64, TensorProto.INT64)
    if names:
        inits += [helper.make_tensor("class_names", TensorProto.STRING, [classes], [n.encode() for n in names]),
                  numpy_helper.from_array(np.array([-1], np.int64), "flat")]
        nodes += [helper.make_node("ArgMax", ["scores"], ["argmax"], axis=1, keepdims=0, name="argmax"),
                  helper.make_node("ArrayFeatureExtractor", ["class_names", "argmax"], ["picked"], domain="ai.onnx.ml",
                                   name="names"),
                  helper.make_node("Reshape", ["picked", "flat"], ["output_label"], name="flatten")]
    else:
        nodes.append(helper.make_node("ArgMax", ["scores"], ["output_label"], axis=1, keepdims=0, name="argmax"))
    nodes.append(helper.make_node("ZipMap", ["scores"], ["output_probability"], domain="ai.onnx.ml", name="zipmap",
                                  **({"classlabels_strings": list(names)} if names
                                     else {"classlabels_int64s": list(range(classes))})))
    probabilities = helper.make_sequence_type_proto(helper.make_map_type_proto(
        key, helper.make_tensor_type_proto(TensorProto.FLOAT, [])))
    graph = helper.make_graph(nodes, "sklearn_style_mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
                              [helper.make_tensor_value_info("output_label", label, ["batch"]),
                               helper.make_value_info("output_probability", probabilities)], inits)
    return save(graph, path, ML_OPSET)


def linear_classifier(path: Path, features: int = 8, classes: int = 3) -> Path:
    """x [batch, features] -> ai.onnx.ml's LinearClassifier with softmax scores, as skl2onnx exports a
    LogisticRegression: its coefficients are attributes of the op, not weight tensors -> label
    (int64 [batch]) and probabilities [batch, classes]."""
    rng = np.random.default_rng(5)
    node = helper.make_node("LinearClassifier", ["x"], ["label", "probabilities"], domain="ai.onnx.ml", name="linear",
                            coefficients=rng.standard_normal(classes * features).astype(np.float32).tolist(),
                            intercepts=np.zeros(classes, np.float32).tolist(), classlabels_ints=list(range(classes)),
                            post_transform="SOFTMAX")
    graph = helper.make_graph([node], "linear_classifier",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
                              [helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]),
                               helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes])])
    return save(graph, path, ML_OPSET)


def detector(path: Path, size: int = 8, channels: int = 16, classes: int = 3, threshold: float = 0.55,
             batch_of_one: bool = False) -> Path:
    """A detector as torchvision exports one: image [3, size, size] (one image, no batch axis; with
    *batch_of_one* [1, 3, size, size], as a YOLO export with NMS takes it) -> Conv
    -> Relu -> Conv -> per cell four box offsets and class logits -> the cells scoring over a
    threshold (NonZero: how many is data-dependent) -> an If like torchvision's batched_nms: none
    kept when there are none, else NonMaxSuppression per class on boxes the branch makes -> boxes
    [n, 4], scores [n], labels [n] (int64)."""
    rng = np.random.default_rng(6)
    cells, values = size * size, 4 + classes
    ys, xs = np.divmod(np.arange(cells, dtype=np.float32), size)
    anchors = np.stack([xs - 1.5, ys - 1.5, xs + 2.5, ys + 2.5], axis=1)  # (overlapping: NMS has work to do)
    consts = {"w1": rng.standard_normal((channels, 3, 3, 3)) / np.sqrt(27), "b1": np.zeros(channels),
              "w2": rng.standard_normal((values, channels, 1, 1)) * 4 / np.sqrt(channels), "b2": np.zeros(values),
              "anchors": anchors, "half": np.array(0.5), "threshold": np.array(threshold),
              "spread": np.array(float(size * 4)), "iou": np.array([0.5])}
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in consts.items()]
    inits += [numpy_helper.from_array(np.asarray(v, np.int64), k) for k, v in
              {"zero": [0], "one": [1], "rows": [values, -1], "split": [4, classes], "most": [100], "none": np.zeros(0),
               "column": np.array(2)}.items()]
    other = helper.make_graph([
        helper.make_node("Cast", ["cand_labels"], ["label_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["label_f", "spread"], ["offset0"]),
        helper.make_node("Unsqueeze", ["offset0", "one"], ["offset"]),
        helper.make_node("Add", ["cand_boxes", "offset"], ["apart"]),  # (classes far apart: NMS per class)
        helper.make_node("Unsqueeze", ["apart", "zero"], ["nms_boxes"]),
        helper.make_node("Unsqueeze", ["cand_scores", "zero"], ["scores1"]),
        helper.make_node("Unsqueeze", ["scores1", "zero"], ["nms_scores"]),
        helper.make_node("NonMaxSuppression", ["nms_boxes", "nms_scores", "most", "iou"], ["selected"]),
        helper.make_node("Gather", ["selected", "column"], ["picked"], axis=1)], "nms", [],
        [helper.make_tensor_value_info("picked", TensorProto.INT64, ["kept"])])
    nothing = helper.make_graph([helper.make_node("Identity", ["none"], ["no_one"])], "nothing", [],
                                [helper.make_tensor_value_info("no_one", TensorProto.INT64, ["kept"])])
    nodes = [helper.make_node("Identity" if batch_of_one else "Unsqueeze", ["image"] + ["zero"] * (not batch_of_one),
                              ["batch1"], name="batch1"),
             helper.make_node("Conv", ["batch1", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["head"], name="head"),
             helper.make_node("Reshape", ["head", "rows"], ["per_value"], name="per_value"),
             helper.make_node("Transpose", ["per_value"], ["per_cell"], name="per_cell", perm=[1, 0]),
             helper.make_node("Split", ["per_cell", "split"], ["deltas", "logits"], name="split", axis=1),
             helper.make_node("Mul", ["deltas", "half"], ["moved"], name="moved"),
             helper.make_node("Add", ["anchors", "moved"], ["all_boxes"], name="all_boxes"),
             helper.make_node("Sigmoid", ["logits"], ["probs"], name="probs"),
             helper.make_node("ReduceMax", ["probs"], ["all_scores"], name="all_scores", axes=[1], keepdims=0),
             helper.make_node("ArgMax", ["probs"], ["all_labels"], name="all_labels", axis=1, keepdims=0),
             helper.make_node("Greater", ["all_scores", "threshold"], ["over"], name="over"),
             helper.make_node("NonZero", ["over"], ["where"], name="where"),
             helper.make_node("Squeeze", ["where", "zero"], ["cand"], name="cand"),
             helper.make_node("Gather", ["all_boxes", "cand"], ["cand_boxes"], name="cand_boxes"),
             helper.make_node("Gather", ["all_scores", "cand"], ["cand_scores"], name="cand_scores"),
             helper.make_node("Gather", ["all_labels", "cand"], ["cand_labels"], name="cand_labels"),
             helper.make_node("Size", ["cand"], ["count"], name="count"),
             helper.make_node("Equal", ["count", "zero_scalar"], ["empty"], name="empty"),
             helper.make_node("If", ["empty"], ["keep"], name="batched_nms", then_branch=nothing, else_branch=other),
             helper.make_node("Gather", ["cand_boxes", "keep"], ["kept_boxes"], name="kept_boxes"),
             # (torchvision's box decoding: corners stacked, flattened, reshaped to the flat size)
             helper.make_node("Reshape", ["kept_boxes", "corner_pairs"], ["corners"], name="corners"),
             helper.make_node("Flatten", ["corners"], ["flat"], name="flat", axis=1),
             helper.make_node("Shape", ["flat"], ["flat_shape"], name="flat_shape"),
             helper.make_node("Gather", ["flat_shape", "zero_scalar"], ["rows_n"], name="rows_n"),
             helper.make_node("Gather", ["flat_shape", "one_scalar"], ["row_size"], name="row_size"),
             helper.make_node("Unsqueeze", ["rows_n", "zero"], ["rows_n1"], name="rows_n1"),
             helper.make_node("Unsqueeze", ["row_size", "zero"], ["row_size1"], name="row_size1"),
             helper.make_node("Concat", ["rows_n1", "row_size1"], ["box_shape"], name="box_shape", axis=0),
             helper.make_node("Reshape", ["corners", "box_shape"], ["boxes"], name="boxes"),
             helper.make_node("Gather", ["cand_scores", "keep"], ["scores"], name="scores"),
             helper.make_node("Gather", ["cand_labels", "keep"], ["labels"], name="labels")]
    inits += [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in
              {"zero_scalar": 0, "one_scalar": 1, "corner_pairs": [-1, 2, 2]}.items()]
    graph = helper.make_graph(nodes, "detector", [helper.make_tensor_value_info(
                                  "image", TensorProto.FLOAT, [1] * batch_of_one + [3, size, size])],
                              [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["detections", 4]),
                               helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["detections"]),
                               helper.make_tensor_value_info("labels", TensorProto.INT64, ["detections"])], inits)
    return save(graph, path)


YOLO_EXTRA = {"detect": 0, "pose": 6, "segment": 4, "obb": 1}  # values per box after the class scores


def yolo(path: Path, size: int = 32, classes: int = 3, rows: bool = False, task: str = "detect",
         repo: str = "ultralytics") -> Path:
    """An Ultralytics-style export (`yolo export format=onnx`): images [1, 3, size, size] -> two
    strided Convs -> output0 [1, 4 + classes + extra, anchors]: each anchor's box as centre x, centre
    y, width, height in pixels, then its class scores after a sigmoid, then the *task*'s values
    (YOLO_EXTRA: pose, 2 keypoints of x, y, visibility; segment, 4 mask coefficients, and output1,
    prototype masks [1, 4, size / 2, size / 2]; obb, the box's angle); with the metadata the exporter
    writes (task, names, stride, imgsz, kpt_shape). *rows*: output0 is instead the top rows of
    detections [1, anchors, 6 + extra] (x1, y1, x2, y2 — OBB: centre and size — score, class,
    extra), as an end-to-end export's, metadata end2end. *repo* "yolov5": output0 is [1, anchors,
    5 + classes], each box, its objectness and class probabilities (sigmoids), as YOLOv5's export
    gives it, with only the metadata YOLOv5 writes (stride, names); "yolov9": the raw head as
    Ultralytics', with YOLOv9's metadata, the same two."""
    rng = np.random.default_rng(7)
    grid, extra, yolov5 = size // 4, YOLO_EXTRA[task], repo == "yolov5"
    channels = 4 + yolov5 + classes + extra
    inits = [numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.4).astype(np.float32), "w1"),
             numpy_helper.from_array(np.zeros(8, np.float32), "b1"),
             numpy_helper.from_array((rng.standard_normal((channels, 8, 3, 3)) * 0.3).astype(np.float32), "w2"),
             numpy_helper.from_array(np.r_[np.zeros(4), np.full(classes + yolov5, -1.5 + 2 * yolov5),
                                           np.zeros(extra)].astype(np.float32), "b2"),
             numpy_helper.from_array(np.array([1, channels, grid * grid], np.int64), "flat"),
             numpy_helper.from_array(np.array([2, 2, classes + yolov5] + [extra] * bool(extra), np.int64), "parts"),
             numpy_helper.from_array(np.array(float(size), np.float32), "scale_xy"),
             # (YOLOv5's: an anchor grid, a tensor of several axes [1, 2, 1], where Ultralytics' is a scalar)
             numpy_helper.from_array(np.full((1, 2, 1) if yolov5 else (), size / 2, np.float32), "scale_wh")]
    split = ["xy", "wh", "cls"] + ["extra"] * bool(extra)
    nodes = [helper.make_node("Conv", ["images", "w1", "b1"], ["c1"], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["c2", "flat"], ["anchors"]),
             helper.make_node("Split", ["anchors", "parts"], split, axis=1),
             helper.make_node("Sigmoid", ["xy"], ["xy01"]), helper.make_node("Mul", ["xy01", "scale_xy"], ["xyp"]),
             helper.make_node("Sigmoid", ["wh"], ["wh01"]), helper.make_node("Mul", ["wh01", "scale_wh"], ["whp"]),
             helper.make_node("Sigmoid", ["cls"], ["scores"])]
    extras = []
    if extra:  # (keypoints and angles from a sigmoid, in pixels and radians; mask coefficients as they come)
        nodes += [helper.make_node("Sigmoid", ["extra"], ["extra01"]),
                  helper.make_node("Mul", ["extra01", "scale_xy"], ["values"])] if task != "segment" else []
        extras = ["values" if task != "segment" else "extra"]
    outputs = []
    if yolov5:  # (objectness and class probabilities are one sigmoid here: "scores", the first its objectness)
        nodes += [helper.make_node("Concat", ["xyp", "whp", "scores"], ["columns"], axis=1),
                  helper.make_node("Transpose", ["columns"], ["output0"], perm=[0, 2, 1])]
        outputs.append(helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, grid * grid, channels]))
    elif not rows:
        nodes.append(helper.make_node("Concat", ["xyp", "whp", "scores", *extras], ["output0"], axis=1))
        outputs.append(helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, channels, grid * grid]))
    else:  # (corners, best score and its class, per anchor: rows as an end-to-end head gives them)
        inits += [numpy_helper.from_array(np.array(0.5, np.float32), "half")]
        nodes += [helper.make_node("Mul", ["whp", "half"], ["hw"]), helper.make_node("Sub", ["xyp", "hw"], ["lo"]),
                  helper.make_node("Add", ["xyp", "hw"], ["hi"]),
                  helper.make_node("ReduceMax", ["scores"], ["best"], axes=[1], keepdims=1),
                  helper.make_node("ArgMax", ["scores"], ["label_i"], axis=1, keepdims=1),
                  helper.make_node("Cast", ["label_i"], ["label"], to=TensorProto.FLOAT),
                  helper.make_node("Concat", (["xyp", "whp"] if task == "obb" else ["lo", "hi"])
                                   + ["best", "label", *extras], ["columns"], axis=1),
                  helper.make_node("Transpose", ["columns"], ["output0"], perm=[0, 2, 1])]
        outputs.append(helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, grid * grid, 6 + extra]))
    if task == "segment":  # (the prototype masks, from the first Conv's map)
        inits.append(numpy_helper.from_array((rng.standard_normal((4, 8, 1, 1)) * 0.5).astype(np.float32), "wp"))
        nodes.append(helper.make_node("Conv", ["r1", "wp"], ["output1"]))
        outputs.append(helper.make_tensor_value_info("output1", TensorProto.FLOAT, [1, 4, size // 2, size // 2]))
    for i, node in enumerate(nodes):
        node.name = f"/model/{node.op_type}_{i}"  # (as torch.onnx.export names them)
    graph = helper.make_graph(nodes, "yolo", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                                              [1, 3, size, size])], outputs, inits)
    model = helper.make_model_gen_version(graph, opset_imports=[helper.make_opsetid("", 17)],
                                          producer_name="pytorch")
    model.ir_version = 8
    names = {i: name for i, name in enumerate(["person", "bicycle", "car", "dog", "cat"][:classes])}
    meta = {"description": "Ultralytics YOLO11n model", "author": "Ultralytics", "task": task, "stride": 4,
            "batch": 1, "imgsz": [size, size], "names": names, "end2end": rows}
    if repo != "ultralytics":
        meta = {"stride": 4, "names": names}
    for key, value in {**meta, **({"kpt_shape": [2, 3]} if task == "pose" else {})}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, str(value)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path
