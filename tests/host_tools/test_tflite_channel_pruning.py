"""Structured channel pruning of TFLite models (host_tools/compress/tflite/channels.py): the pruned
flatbuffer computes what the original did, recovery brings the accuracy back, and what it leaves
whole is named."""

from collections import Counter

import numpy as np
import pytest

from host_tools.compress import Dataset, ModelFile, load_recipe, run_recipe
from host_tools.compress.tflite import flatbuffer
from host_tools.compress.tflite.channels import plan_channel_pruning, stale_shape_constants
from host_tools.compress.tflite.graph import Graph
from host_tools.compress.tflite.prune import prepared_plan
from tests.conftest import FIXTURES, MODELS
from tests.host_tools.test_compress import HELDOUT, TRAIN, steps

pytest.importorskip("ai_edge_litert")


def _silenced(path, out, exclude=()):
    """*path* with half the channels of every group the planner would prune made exactly zero in every
    constant that pruning cuts (weights, biases, per-channel constants, the reading layers' inputs):
    the channels pruning by weight norm removes first, and whose removal changes no output."""
    tree, outside = flatbuffer.read(path)
    plan = prepared_plan(tree, path, exclude)  # (values computed from constants alone made constants first)
    g = Graph(tree)
    for region in plan.regions:
        # the middle two of every four units: pruning must score each unit (a head: its rows in each of
        # Q, K and V) by its own rows, or it picks others
        silent = np.array([c for c in range(region.channels) if c % 4 in (1, 2)])
        for k, position, axis, positions in region.edits:
            t = g.input(k, position)
            values = g.const(t).copy()
            index = [slice(None)] * values.ndim
            index[axis] = positions[silent].ravel()
            if g.kinds[k] == "CONV_2D" and axis == 3 and values.shape[3] != g.shape(g.input(k, 0))[-1]:
                # a grouped convolution's filter [out, h, w, in / groups]: input channel c is column
                # c % (in / groups) of its group's rows
                rows, per_group = values.shape[0] // (g.shape(g.input(k, 0))[-1] // values.shape[3]), values.shape[3]
                for c in positions[silent].ravel():
                    values[c // per_group * rows:(c // per_group + 1) * rows, ..., c % per_group] = 0
            else:
                values[tuple(index)] = 0
            tree.buffers[g.tensor(t).buffer].data = np.frombuffer(values.tobytes(), np.uint8).copy()
    flatbuffer.write(tree, outside, out)
    return ModelFile(out, "tflite"), plan


def _shape_constants_agree(path) -> None:
    assert stale_shape_constants(flatbuffer.read(path)[0]) == {}


def _outputs(model: ModelFile, samples: int = 6):
    runtime = model.load()
    rng = np.random.default_rng(1)
    got = []
    for _ in range(samples):
        feeds = {}
        for spec in runtime.inputs:
            shape = [d if isinstance(d, int) else 1 for d in spec.shape]
            feeds[spec.name] = (rng.integers(0, 20, shape) if spec.dtype.startswith("int")
                                else rng.standard_normal(shape)).astype(spec.dtype)
        got.append(runtime.run(feeds))
    return got


# the transformer's residual stream (the embedding, each block's last layers): pruned through the
# LayerNorms, whose statistics then come from fewer channels (tested with recovery, below)
STREAM = ("FULLY_CONNECTED #3", "FULLY_CONNECTED #37", "FULLY_CONNECTED #53", "FULLY_CONNECTED #87",
          "FULLY_CONNECTED #103")


@pytest.mark.parametrize("path, layers, exclude", [
    (MODELS / "digits_cnn.tflite", 3, ()),  # a depthwise first convolution, a transposed flatten into the classifier
    (MODELS / "digits_vgg.tflite", 6, ()),
    # the two feed-forward layers (through GELU), two attention layers' heads (through the reshapes,
    # transposes and slices that split Q, K and V and the heads, and the per-head matrix products)
    (MODELS / "digits_transformer.tflite", 4, STREAM),
    (FIXTURES / "detector.tflite", 3, ()),  # a backbone read by several heads
    (FIXTURES / "crnn_ocr.tflite", 3, ()),  # a CNN whose last layer feeds an LSTM read both ways
    # a residual stream tied to the squeeze-and-excitation gate that scales it (stem, projection and
    # gate in one group), the expansion width through a depthwise convolution, concatenated branches
    (FIXTURES / "mobile_blocks.tflite", 7, ()),
    # embeddings, the attention output and the feed-forward output tied as one stream; grouped-query
    # attention: each K/V head taken with the two query heads it serves, through the broadcast that
    # repeats it for them
    (FIXTURES / "token_classifier.tflite", 7, ()),
    # one layer computes Q, K and V, split in three by SLICEs: each part pruned by heads, tied to the others
    (FIXTURES / "fused_qkv.tflite", 5, ()),
    # one block applied twice with the same weights (ALBERT): each shared layer is one layer, its two
    # uses tied; the word embedding table, read again as the output layer's weight (GPT-2), pruned
    # along the residual stream in both roles
    (FIXTURES / "shared_layers.tflite", 13, ()),
    # ViT's embeddings: the patch convolution's stream, through the class token (a constant joined
    # along the tokens, which loses the same channels) and the position table, and a residual MLP
    (FIXTURES / "patch_tokens.tflite", 3, ()),
    # a coarse scale resized (bilinear) to the fine one's size and joined with it: each convolution
    # at its offset in the joined tensor, through the RESIZE_BILINEAR
    (FIXTURES / "two_scales.tflite", 3, ()),
    # ResNeXt's bottlenecks: each grouped 3x3 convolution loses as many input and output channels in
    # each of its groups, one of them strided, and the stream through the projection shortcut, to
    # which a grouped convolution adds its output (as many from each of its groups, there too)
    (FIXTURES / "grouped_blocks.tflite", 9, ()),
    # Swin's patch merging: the stream (patch convolution and residual MLP) through four STRIDED_SLICEs
    # of other axes joined along the channels, each channel at four places of the joined tensor
    (FIXTURES / "patch_merging.tflite", 4, ()),
    # a position table resized to the grid of patches at every run (~100 ops of bicubic arithmetic on
    # constants), computed once: a per-channel constant, cut with the patch convolution's stream
    (FIXTURES / "resized_positions.tflite", 3, ()),
    # YOLO's C2f split: a layer's channels in two windows (SLICEs), the first pruned, the second given
    # out whole, its SLICE starting earlier by what the first lost (YOLO11n's TFLite export had not
    # loaded: "Invalid begin and size")
    (FIXTURES / "split_windows.tflite", 2, ()),
    # YOLO's C2f and SPPF (7 regions: the first convolution's two windows, each its own): the second
    # half's channels joined at two places (as they are, and summed with the bottleneck's output),
    # SPPF's map at four (it and its three max-pools); each place is an input channel of the
    # convolution that reads the join (YOLO11n's TFLite export had left 12 layers whole: "read by
    # CONV_2D along another axis")
    (FIXTURES / "c2f_sppf.tflite", 7, ()),
], ids=lambda v: getattr(v, "stem", None) or (str(v) if isinstance(v, int) else "stream-left" if v else "all"))
def test_pruned_channels_that_carry_nothing_leave_every_output_as_it_was(tmp_path, path, layers, exclude):
    """Half of each group's channels are exact zeros wherever pruning cuts: removing exactly those
    channels, and the matching inputs of the layers that read them (a flattened block of features
    each, through the transpose before it; a concatenation's part), must change no output."""
    silenced, plan = _silenced(path, tmp_path / "silenced.tflite", exclude)
    assert len(plan.regions) == layers, plan.summary()
    report = run_recipe(silenced, steps([("tflite-prune-channels", {"ratio": 0.5, "exclude": list(exclude)})]),
                        latency_runs=5, workdir=tmp_path)
    assert report.steps[0].status == "ok", report.steps[0].note
    pruned = report.result.model
    assert pruned.size_bytes < 0.9 * silenced.size_bytes
    tree, _ = flatbuffer.read(pruned.path)
    graph = tree.subgraphs[0]
    halved = Counter()  # every pruned layer loses half its output channels (or heads; of each part of a split one)
    for region in plan.regions:
        k, position, axis, units = region.edits[0]
        halved[k, position, axis] += units.size // 2
    before = flatbuffer.read(silenced.path)[0].subgraphs[0]
    for (k, position, axis), fewer in halved.items():
        shape = lambda g: g.tensors[g.operators[k].inputs[position]].shape[axis]  # noqa: E731
        assert shape(graph) == shape(before) - fewer
    _shape_constants_agree(pruned.path)
    for want, got in zip(_outputs(silenced), _outputs(pruned)):
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-4)


def test_the_cnn_halved_and_recovered_keeps_its_accuracy(tmp_path):
    model = ModelFile.open(MODELS / "digits_cnn.tflite")
    report = run_recipe(model, steps([("tflite-prune-channels", {"ratio": 0.5, "recover_epochs": 12})]),
                        eval_data=str(HELDOUT), train=str(TRAIN), latency_runs=20, workdir=tmp_path)
    step = report.steps[0]
    assert step.status == "ok", step.note
    assert step.size_bytes < 0.35 * report.original.size_bytes  # 3 of 4 layers at half width: ~1/4 of the weights
    assert report.original.fidelity.accuracy - step.fidelity.accuracy <= 0.01


def test_the_transformer_loses_half_its_heads_stream_and_feed_forward_width_and_recovers(tmp_path):
    tree, _ = flatbuffer.read(MODELS / "digits_transformer.tflite")
    plan = plan_channel_pruning(tree)
    assert plan.summary() == "9 layers in 5 groups; left whole: 1 (1 x its output is a graph output)"
    groups = {tuple(sorted(f"FULLY_CONNECTED #{r.layer}" for r in group)) for group in plan.groups}
    assert groups == {tuple(sorted(STREAM)), ("FULLY_CONNECTED #51",), ("FULLY_CONNECTED #101",),  # feed-forward
                      ("FULLY_CONNECTED #17",), ("FULLY_CONNECTED #67",)}  # Q/K/V, by heads
    heads = next(r for r in plan.regions if r.layer == 17)
    assert heads.channels == 4 and heads.edits[0][3].shape == (4, 48)  # 4 heads: 16 outputs in each of Q, K, V
    model = ModelFile.open(MODELS / "digits_transformer.tflite")
    report = run_recipe(model, load_recipe("channels-50", "tflite"), eval_data=str(HELDOUT), train=str(TRAIN),
                        latency_runs=20, workdir=tmp_path)
    step = report.steps[0]
    assert step.status == "ok", step.note
    assert step.size_bytes < 0.4 * report.original.size_bytes
    assert report.original.fidelity.accuracy - step.fidelity.accuracy <= 0.01
    # the shape constants a pruned layer needs its own copy of are named apart: litert-quantizer refuses
    # a model with a tensor name twice, which kept pruned + full int8 from running on it
    assert not flatbuffer.lacks_unique_names(step.model.path.read_bytes())
    int8 = run_recipe(step.model, steps([("tflite-int8", {"calibration": str(TRAIN), "samples": 32})]),
                      eval_data=str(HELDOUT), latency_runs=5, workdir=tmp_path / "int8")
    assert int8.steps[0].status == "ok", int8.steps[0].note
    assert step.fidelity.accuracy - int8.steps[0].fidelity.accuracy <= 0.02


def test_what_it_cannot_prune_safely_is_left_whole_and_named():
    tree, _ = flatbuffer.read(FIXTURES / "detector.tflite")
    skipped = plan_channel_pruning(tree).skipped
    # a head's anchors x classes, reshaped into boxes (and grouped by class: a softmax across them)
    assert skipped["CONV_2D #7"] == "reshaped across its channels (RESHAPE #8)"
    assert skipped["CONV_2D #14"] == "reshaped across its channels (RESHAPE #15)"
    tree, _ = flatbuffer.read(FIXTURES / "crnn_ocr.tflite")
    skipped = plan_channel_pruning(tree).skipped
    assert skipped["FULLY_CONNECTED #775"] == "reduced over its channels (REDUCE_MAX #776)"  # log-softmax's max
    assert skipped["FULLY_CONNECTED #391"] == "feeds REVERSE_V2 #392"
    # an unrolled LSTM: one weight for every step, so every step's layer is one layer; the steps' outputs
    # are concatenated with the other direction's
    assert skipped["FULLY_CONNECTED #45"] == \
        "its output meets another branch at CONCATENATION #390 (a residual connection or a gate)"


def test_a_grouped_convolution_keeps_groups_of_one_size_whatever_its_weights_ask(tmp_path):
    """Pruned with its own weights, where the least important half overall is not half of each group,
    each grouped 3x3 convolution still loses as many channels in each of its 4 groups: the bottlenecks'
    filters read 4 of each group's 8 channels, and the model runs. The last one reads two layers
    joined by a CONCATENATION, whose groups do not line up with either: those two stay whole, named,
    and it keeps its 16 inputs while its output loses half of the stream's 24 channels."""
    tree, _ = flatbuffer.read(FIXTURES / "grouped_blocks.tflite")
    skipped = plan_channel_pruning(tree).skipped
    assert skipped == {"CONV_2D #12": "read by CONV_2D #16 in groups that do not line up with its channels",
                       "CONV_2D #13": "read by CONV_2D #16 in groups that do not line up with its channels",
                       "FULLY_CONNECTED #20": "its output is a graph output"}
    model = ModelFile.open(FIXTURES / "grouped_blocks.tflite")
    report = run_recipe(model, steps([("tflite-prune-channels", {"ratio": 0.5})]), latency_runs=5, workdir=tmp_path)
    assert report.steps[0].status == "ok", report.steps[0].note
    g = Graph(flatbuffer.read(report.result.model.path)[0])
    grouped = [(g.shape(g.input(k, 0))[-1], g.shape(g.input(k, 1))) for k, kind in enumerate(g.kinds)
               if kind == "CONV_2D" and g.shape(g.input(k, 1))[1] == 3 and g.shape(g.input(k, 0))[-1] != 3]
    assert grouped == [(16, [16, 3, 3, 4])] * 2 + [(16, [12, 3, 3, 4])]
    assert all(np.isfinite(v).all() for out in _outputs(report.result.model) for v in out.values())


def test_swin_patch_merging_is_pruned_through_the_layernorm_of_its_joined_channels(tmp_path):
    """Swin normalises the four joined views of its map before projecting them down (litert-torch
    writes the LayerNorm as MEANs over the channels and folds its scale and bias into the projection):
    the means take each stream channel at its four places, and the projection loses four inputs per
    channel. The statistics then come from fewer channels (what recovery trains for), so this checks
    the structure: half the stream's 8 channels gone from each of the four views, and the model runs."""
    path = FIXTURES / "patch_merging_norm.tflite"
    plan = plan_channel_pruning(flatbuffer.read(path)[0])
    assert plan.skipped == {"FULLY_CONNECTED #29": "its output is a graph output"}
    stream = next(group for group in plan.groups if len(group) == 2)
    assert [(op, positions.shape) for op, _, _, positions in stream[0].edits if positions.shape[1] > 1] == \
        [(26, (8, 4))]  # the projection: each of the 8 channels at 4 places of its 32 inputs
    report = run_recipe(ModelFile.open(path), steps([("tflite-prune-channels", {"ratio": 0.5})]), latency_runs=5,
                        workdir=tmp_path)
    assert report.steps[0].status == "ok", report.steps[0].note
    g = Graph(flatbuffer.read(report.result.model.path)[0])
    projection = next(k for k, kind in enumerate(g.kinds) if kind == "FULLY_CONNECTED" and
                      g.shape(g.input(k, 1)) == [8, 16])  # 2·8 outputs at half, from 4·4 joined channels
    assert g.shape(g.input(projection, 0))[-1] == 16
    assert all(np.isfinite(v).all() for out in _outputs(report.result.model) for v in out.values())


def test_a_group_norm_written_out_is_followed_through_its_statistics(tmp_path):
    """litert-torch writes PoolFormer's GroupNorm(1, C) as means over the channels and positions
    together, the inverse deviation times the norm's own scale (one per channel), broadcast back to
    the channel count. The statistics are followed as the same for every channel until the scale or
    the broadcast gives the channels back: the stream is pruned through both norms, their scales and
    shifts lose the same channels, and the model runs. (As with a LayerNorm, the statistics then come
    from fewer channels, what recovery trains for; onnx-prune-channels' GroupNorm test checks those
    numbers against PyTorch.)"""
    path = FIXTURES / "pooling_blocks.tflite"
    plan = plan_channel_pruning(flatbuffer.read(path)[0])
    assert plan.skipped == {"FULLY_CONNECTED #46": "its output is a graph output"}
    assert sorted(sorted(Graph(flatbuffer.read(path)[0]).label(r.layer) for r in group) for group in plan.groups) == \
        [["CONV_2D #2", "CONV_2D #42"], ["CONV_2D #40"]]
    report = run_recipe(ModelFile.open(path), steps([("tflite-prune-channels", {"ratio": 0.5})]), latency_runs=5,
                        workdir=tmp_path)
    assert report.steps[0].status == "ok", report.steps[0].note
    g = Graph(flatbuffer.read(report.result.model.path)[0])
    per_channel = sorted(g.shape(t) for k in range(len(g.ops)) for t in map(int, g.ops[k].inputs)
                         if t >= 0 and g.const(t) is not None and len(g.shape(t)) == 4 and g.shape(t)[:2] == [1, 1]
                         and g.shape(t)[3] == 1 and g.shape(t)[2] > 1)
    assert per_channel == [[1, 1, 8, 1]] * 4  # both norms' scales and shifts
    assert all(np.isfinite(v).all() for out in _outputs(report.result.model) for v in out.values())


def test_values_computed_from_constants_alone_become_constants_that_compute_the_same(tmp_path):
    """litert-torch leaves the bicubic resizing of a position table to the grid of patches in the
    graph, ~100 ops run at every inference on constants alone. Read once from the interpreter, their
    result is a constant: the ops go, and the model computes what it did."""
    from host_tools.compress.tflite.fold import constant_ops

    path = FIXTURES / "resized_positions.tflite"
    tree, outside = flatbuffer.read(path)
    before = len(tree.subgraphs[0].operators)
    assert constant_ops(tree, path) == 1
    assert len(tree.subgraphs[0].operators) < before - 50
    graph = tree.subgraphs[0]
    # nor are the folded ops' results and the constants only they read: a tensor no op makes or reads,
    # with no data, stopped litert-quantizer's calibration ("Tensor data is null") of a pruned ViT
    read = {int(t) for op in graph.operators for t in (*op.inputs, *op.outputs)}
    assert read | {int(t) for t in (*graph.inputs, *graph.outputs)} == set(range(len(graph.tensors)))
    flatbuffer.write(tree, outside, tmp_path / "folded.tflite")
    folded = ModelFile(tmp_path / "folded.tflite", "tflite")
    for want, got in zip(_outputs(ModelFile(path, "tflite")), _outputs(folded)):
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-6)
    calibration = Dataset({spec.name: np.random.default_rng(0).standard_normal((8, *spec.shape[1:])).astype(np.float32)
                           for spec in folded.load().inputs}, None, "random")
    int8 = run_recipe(folded, steps([("tflite-int8", {"calibration": calibration})]), latency_runs=5,
                      workdir=tmp_path / "int8")
    assert int8.steps[0].status == "ok", int8.steps[0].note


def test_a_quantized_model_is_refused_in_one_line(tmp_path):
    model = ModelFile.open(MODELS / "digits_cnn.tflite")
    report = run_recipe(model, steps([("tflite-dynamic", {}), ("tflite-prune-channels", {})]), latency_runs=5,
                        workdir=tmp_path)
    pruning = report.steps[1]
    assert pruning.status == "skipped"
    assert "its weight is not float32 (prune before quantizing)" in pruning.note


def test_grouped_query_attention_loses_each_kv_head_with_the_query_heads_it_serves(tmp_path):
    """4 query heads share 2 K/V heads (repeated by a BROADCAST_TO): removing a K/V head must remove
    the two query heads that read it, or Q·Kᵀ would pair the wrong heads."""
    path = FIXTURES / "token_classifier.tflite"
    plan = plan_channel_pruning(flatbuffer.read(path)[0])
    groups = {tuple(sorted(r.layer for r in group)) for group in plan.groups}
    assert groups == {(1, 31, 35), (4, 7, 10), (33,)}, groups  # stream (embedding first), attention, feed-forward
    units = {r.layer: r.edits[0][3].shape for r in plan.regions}
    assert units[4] == (2, 16) and units[7] == units[10] == (2, 8)  # a unit: 2 query heads of 8, or a K/V head
    report = run_recipe(ModelFile.open(path), steps([("tflite-prune-channels", {"ratio": 0.5})]), latency_runs=5,
                        workdir=tmp_path)
    assert report.steps[0].status == "ok", report.steps[0].note
    g = Graph(flatbuffer.read(report.result.model.path)[0])
    weights = {k: g.shape(g.input(k, 1)) for k in (4, 7, 10, 31)}
    assert weights == {4: [16, 16], 7: [8, 16], 10: [8, 16], 31: [16, 16]}, weights  # stream 32 -> 16 too
    assert list(g.const(g.input(14, 1))) == [1, 1, 2, 12, 8]  # the broadcast repeats one K/V head, twice
    _shape_constants_agree(report.result.model.path)


def test_a_layer_split_in_three_loses_the_same_heads_in_each_part(tmp_path):
    path = FIXTURES / "fused_qkv.tflite"
    plan = plan_channel_pruning(flatbuffer.read(path)[0])
    parts = sorted((r.edits[0][3].shape, int(r.edits[0][3].min())) for r in plan.regions if r.layer == 2)
    assert parts == [((4, 8), 0), ((4, 8), 32), ((4, 8), 64)]  # Q, K and V: 4 heads of 8 outputs each
    report = run_recipe(ModelFile.open(path), steps([("tflite-prune-channels", {"ratio": 0.5})]), latency_runs=5,
                        workdir=tmp_path)
    g = Graph(flatbuffer.read(report.result.model.path)[0])
    assert g.shape(g.input(2, 1)) == [48, 16]  # 2 heads left in each part, of a stream pruned to 16
    # each SLICE starts where its part now starts, and takes what is left of it
    assert [(int(g.const(g.input(k, 1))[-1]), int(g.const(g.input(k, 2))[-1])) for k in (4, 5, 6)] == \
        [(0, 16), (16, 16), (32, 16)]


def test_fine_tuning_reads_each_graph_as_tflite_runs_it():
    """The PyTorch reading of a TFLite graph (which recovery trains) gives TFLite's outputs, on the
    reference models and the foreign ones: token ids and masks, an unrolled LSTM read both ways
    (REVERSE_V2), a GRU's state, grouped-query attention, a split Q/K/V layer, a U-Net's
    TRANSPOSE_CONV and TensorFlow's, cropped to "same" padding, YOLO's oriented boxes turned by COS
    and SIN."""
    torch = pytest.importorskip("torch")
    from host_tools.compress.torch.tflite_module import TfliteModule

    paths = [MODELS / f"digits_{m}.tflite" for m in ("cnn", "vgg", "transformer")]
    paths += [FIXTURES / f"{m}.tflite" for m in ("detector", "mobile_blocks", "token_classifier", "fused_qkv",
                                                 "shared_layers", "text_encoder", "crnn_ocr", "streaming_kws", "u_net",
                                                 "keras_upsample", "yolo_obb")]
    for path in paths:
        runtime = ModelFile.open(path).load()
        module = TfliteModule(flatbuffer.read(path)[0])
        rng = np.random.default_rng(0)
        feeds = {spec.name: (rng.integers(0, 100, (3, *spec.shape[1:])) if spec.dtype.startswith("int")
                             else rng.standard_normal((3, *spec.shape[1:]))).astype(spec.dtype)
                 for spec in runtime.inputs}
        with torch.no_grad():
            mine = module(*[torch.from_numpy(feeds[name]) for name in module.input_names])
        for i in range(3):
            theirs = runtime.run({name: x[i:i + 1] for name, x in feeds.items()})
            for name, value in zip(module.output_names, mine):
                np.testing.assert_allclose(value[i].numpy().reshape(theirs[name].shape), theirs[name],
                                           rtol=1e-3, atol=1e-4, err_msg=f"{path.name}: {name}")


def test_a_u_net_is_pruned_and_recovered_through_its_transposed_convolution(tmp_path):
    """channels-50 on a U-Net converted by litert-torch: recovery runs TRANSPOSE_CONV (it was skipped
    whole: "fine-tuning cannot run op(s) TRANSPOSE_CONV") and brings the class map back towards the
    original's."""
    data = Dataset({"image": np.random.default_rng(0).random((64, 3, 16, 16)).astype(np.float32)}, None, "random")
    _halved_and_recovered(ModelFile.open(FIXTURES / "u_net.tflite"), data, 5, 0.8, tmp_path)


def _halved_and_recovered(model, data, epochs: int, size: float, tmp_path) -> None:
    """tflite-prune-channels at half, without and with *epochs* of recovery: recovery must run, leave
    under *size* of the original's file, and bring the outputs back towards the original's."""
    pruned, recovered = (run_recipe(model, steps([("tflite-prune-channels", {"ratio": 0.5, "recover_epochs": n})]),
                                    train=data, eval_data=data, latency_runs=5, workdir=tmp_path / str(n))
                         for n in (0, epochs))
    assert recovered.steps[0].status == "ok", recovered.steps[0].note
    assert recovered.result.size_bytes < size * recovered.original.size_bytes
    assert recovered.result.fidelity.cosine > pruned.result.fidelity.cosine, \
        (pruned.result.fidelity, recovered.result.fidelity)


def test_a_residual_stream_and_the_gate_that_scales_it_lose_the_same_channels(tmp_path):
    tree, _ = flatbuffer.read(FIXTURES / "mobile_blocks.tflite")
    plan = plan_channel_pruning(tree)
    groups = sorted(sorted(f"#{r.layer}" for r in group) for group in plan.groups)
    # stem + projection (added) + the excitation layer (its sigmoid multiplies the sum): one stream
    assert ["#10", "#2", "#5"] in groups and ["#13"] in groups and ["#14"] in groups, groups
    assert plan.summary() == "7 layers in 5 groups; left whole: 1 (1 x its output is a graph output)"
    model = ModelFile.open(FIXTURES / "mobile_blocks.tflite")
    report = run_recipe(model, steps([("tflite-prune-channels", {"ratio": 0.5})]), latency_runs=5, workdir=tmp_path)
    pruned, _ = flatbuffer.read(report.result.model.path)
    graph = pruned.subgraphs[0]
    widths = {k: list(graph.tensors[graph.operators[k].outputs[0]].shape) for k in (2, 3, 4, 5, 6, 12, 15)}
    assert widths == {2: [1, 16, 16, 8], 3: [1, 16, 16, 24], 4: [1, 16, 16, 24], 5: [1, 16, 16, 8],
                      6: [1, 16, 16, 8], 12: [1, 16, 16, 8], 15: [1, 16, 16, 12]}


def test_layers_that_share_a_weight_lose_the_same_channels_and_still_share_it(tmp_path):
    """ALBERT applies one block again with the same weights, GPT-2 reads its word embedding table
    again as its output layer's weight. A shared layer is pruned as one layer, in every place it is
    applied, and the pruned file still stores each shared weight once; the table loses the residual
    stream's channels in both its roles (its rows stay: they are the vocabulary)."""
    path = FIXTURES / "shared_layers.tflite"
    tree, _ = flatbuffer.read(path)
    g = Graph(tree)
    layers = [k for k, kind in enumerate(g.kinds) if kind in ("FULLY_CONNECTED", "EMBEDDING_LOOKUP")]
    shared = [[k for k in layers if g.tensor(g.input(k, 1)).buffer == buffer] for buffer in g.buffer_uses]
    shared = sorted(ops for ops in shared if len(ops) > 1)
    # the table and the output layer; Q, K, V, the attention output, the feed-forward pair, each twice
    assert shared == [[1, 58], [4, 31], [7, 34], [9, 36], [25, 52], [27, 54], [29, 56]]
    plan = plan_channel_pruning(tree)
    group_of = {r.layer: n for n, group in enumerate(plan.groups) for r in group}
    for first, again in shared[1:]:  # the block's layers: both uses in one group
        assert group_of[first] == group_of[again]
    assert 58 not in group_of and group_of[1] == group_of[25]  # the table: pruned with the stream it starts

    report = run_recipe(ModelFile.open(path), steps([("tflite-prune-channels", {"ratio": 0.5})]), latency_runs=5,
                        workdir=tmp_path)
    assert report.steps[0].status == "ok", report.steps[0].note
    pruned = Graph(flatbuffer.read(report.result.model.path)[0])
    for ops in shared:
        assert len({pruned.tensor(pruned.input(k, 1)).buffer for k in ops}) == 1, ops
    assert pruned.shape(pruned.input(1, 1)) == pruned.shape(pruned.input(58, 1)) == [100, 16]
    assert pruned.shape(pruned.input(4, 1)) == [16, 16] and pruned.shape(pruned.input(27, 1)) == [32, 16]
    assert report.result.size_bytes < 0.55 * report.original.size_bytes  # a copy per use: ~0.7
    shapes = lambda model: [o.shape for o in model.load().outputs]  # noqa: E731
    assert shapes(report.result.model) == shapes(ModelFile.open(path))


def test_fine_tuning_trains_a_weight_two_layers_share_as_one():
    """GPT-2 reads its token embedding again as its output layer: one buffer, two tensors. Trained as
    two parameters, writing them back would keep whichever came last."""
    pytest.importorskip("torch")
    from host_tools.compress.torch.tflite_module import TfliteModule

    tree, _ = flatbuffer.read(FIXTURES / "token_classifier.tflite")
    g = Graph(tree)
    q, o = g.input(4, 1), g.input(31, 1)  # two [32, 32] weights: let the output projection reuse Q's
    g.tensor(o).buffer = g.tensor(q).buffer
    module = TfliteModule(tree)
    assert module.names[q] == module.names[o]
    assert len(module.params) == len(TfliteModule(flatbuffer.read(FIXTURES / "token_classifier.tflite")[0]).params) - 1


def test_a_keras_encoder_loses_stream_channels_through_tensorflows_layer_norms(tmp_path):
    """TensorFlow's converter writes LayerNormalization out, and multiplies the norm's scale into
    rsqrt(variance) before it meets the channels: the residual stream met that product, which no
    layer explained, and stayed whole ("meets another branch at MUL"). The product's channels are
    the scale's, which loses them; the stream (the first Dense, the attention's output projection, the
    second feed-forward layer) is pruned with the heads and the feed-forward width, and recovery
    brings the pruned model's outputs back towards the original's."""
    path = FIXTURES / "keras_encoder.tflite"
    tree, _ = flatbuffer.read(path)
    plan = prepared_plan(tree, path)
    assert sorted(sorted(r.layer for r in group) for group in plan.groups) == [[0, 16, 31], [1, 3, 10], [29]]
    model = ModelFile.open(path)
    features = np.random.default_rng(0).standard_normal((64, 16, 24)).astype(np.float32)
    _halved_and_recovered(model, Dataset({model.load().inputs[0].name: features}, None, "random"), 10, 0.5, tmp_path)
