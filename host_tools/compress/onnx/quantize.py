"""int8 quantization with ONNX Runtime: dynamic, and static QDQ calibrated on the user's data."""

from __future__ import annotations

import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from device_agent.detections import as_objects
from device_agent.detections import compare as compare_detections
from device_agent.errors import ConfigError, ModelError, NotApplicable
from host_tools.compress import evaluate
from host_tools.compress.data import Dataset, load_dataset
from host_tools.compress.model import ModelFile
from host_tools.compress.onnx.boundary import (DYNAMIC_OPS, STATIC_OPS, counted_nodes, float16_weights,
                                               forget_counted_sizes_in, index_nodes, output_path,
                                               quantized_already, quiet_ort_quantizer, weighted_nodes,
                                               with_opset_at_least)
from host_tools.compress.onnx.calibration import UNBOUNDED, CalibrationReader, calibrate_histograms
from host_tools.compress.onnx.initializers import own_small_constants, shared_vectors, value_names
from host_tools.compress.onnx.params import MIN_ELEMENTS, store_params_as_uint8
from host_tools.compress.passes import Pass, PassConfig, failing_as, progress, register
from host_tools.compress.yolo import decode_nodes

NO_CALIBRATION = "needs calibration data (--calib): static quantization will not calibrate on random noise"
_EXCLUDE_HELP = "node names to leave in float"
_OPS_HELP = "only quantize these op types (empty: all ORT can)"
RECURRENT_FLOAT = ("GRU", "RNN")  # weighted ops ONNX Runtime has no int8 kernel for
# layers whose weights static int8 leaves float where it leaves the layer float (their other readers,
# had they any, would be DequantizeLinear nodes, whose inputs stay as they are)
_FLOAT_LAYERS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "LSTM", "Gather"})


@register
class OnnxDynamicInt8(Pass):
    """Weights stored as int8, activations quantized at run time. Suits MatMul-heavy models
    (transformers, RNNs); on CPUs without int8 dot products its convolutions can be slower."""

    name = "onnx-dynamic"
    formats = ("onnx",)
    summary = "dynamic int8 (weights int8, activations quantized at run time)"
    requires = ("onnx", "onnxruntime")

    @dataclass(frozen=True)
    class Config(PassConfig):
        per_channel: bool = field(default=False, metadata={"help": "one scale per output channel"})
        reduce_range: bool = field(default=False, metadata={
            "help": "7-bit weights (avoids u8s8 saturation on AVX2/AVX-512 without VNNI)"})
        op_types: tuple[str, ...] = field(default=(), metadata={"help": _OPS_HELP})
        exclude: tuple[str, ...] = field(default=(), metadata={"help": _EXCLUDE_HELP})

    @quiet_ort_quantizer()
    def run(self, model, config, workdir):
        from onnxruntime.quantization import QuantType, quantize_dynamic

        _require_weighted_nodes(model, config.op_types or DYNAMIC_OPS)
        out = output_path(workdir, model, "dynamic")
        with failing_as(self.name, model):
            quantize_dynamic(str(model.path), str(out), weight_type=QuantType.QInt8,
                             per_channel=config.per_channel, reduce_range=config.reduce_range,
                             op_types_to_quantize=list(config.op_types) or None,
                             nodes_to_exclude=list(config.exclude) or None)
        _say_float_recurrent(model.path)
        return ModelFile(out, "onnx")


def _say_float_recurrent(path: Path, stored: bool = False) -> None:
    """A progress line naming the GRU and RNN layers, which stay in float (ONNX Runtime quantizes an
    LSTM's weights, dynamically, but has no int8 GRU or RNN) and can hold most of a speech model's
    weights: the report's size would otherwise leave the user guessing why. The line says whether
    their weights are *stored* as 8-bit already, or names the pass that does it (int8-dynamic runs it
    next)."""
    left = Counter(op for _, op in weighted_nodes(path, RECURRENT_FLOAT))
    if left:
        listed = ", ".join(f"{count} {op}" for op, count in sorted(left.items()))
        then = ("their weights stored as 8-bit" if stored else "onnx-int8-params stores their weights as 8-bit")
        progress(f"      left in float: {listed} node(s) (ONNX Runtime has no int8 GRU or RNN); {then}, their "
                 "compute staying float")


def _quantize_dynamic(source: Path, dest: Path, exclude: list[str]) -> None:
    """The LSTM layers of a QDQ model as DynamicQuantizeLSTM: int8 weights, inputs quantized at run
    time. Nothing else is touched."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(dest), weight_type=QuantType.QInt8, op_types_to_quantize=["LSTM"],
                     nodes_to_exclude=exclude or None)


@register
class OnnxStaticInt8(Pass):
    """Weights and activations int8 in QDQ format, activation ranges calibrated on real inputs.
    Refuses to run without calibration data rather than calibrate on noise."""

    name = "onnx-static"
    formats = ("onnx",)
    summary = "static int8 QDQ, calibrated (MinMax, Entropy or Percentile)"
    requires = ("onnx", "onnxruntime")

    @dataclass(frozen=True)
    class Config(PassConfig):
        calibration: Dataset | str | None = field(default=None, metadata={
            "help": "calibration inputs (.npz, folder, loader); default: --calib", "required": True})
        method: Literal["minmax", "entropy", "percentile"] = field(default="minmax", metadata={
            "help": "how activation ranges are chosen from the calibration outputs (entropy: ONNX Runtime's KL "
                    "search over a histogram of 2,048 bins; percentile: the percentile= of the values)"})
        percentile: float = field(default=99.999, metadata={"help": "for method=percentile"})
        samples: int = field(default=256, metadata={"help": "calibration samples used at most"})
        per_channel: bool = field(default=False, metadata={"help": "one weight scale per output channel"})
        reduce_range: bool = field(default=False, metadata={
            "help": "7-bit weights (avoids u8s8 saturation on AVX2/AVX-512 without VNNI)"})
        activations: Literal["uint8", "int8"] = field(default="uint8", metadata={
            "help": "activation type (uint8 with int8 weights is ORT's fast CPU path)"})
        op_types: tuple[str, ...] = field(default=(), metadata={"help": _OPS_HELP})
        exclude: tuple[str, ...] = field(default=(), metadata={"help": _EXCLUDE_HELP})
        auto_exclude: int = field(default=0, metadata={
            "help": "also leave the N nodes in float whose quantization alone hurts the output most"})
        lstm: Literal["dynamic", "float"] = field(default="dynamic", metadata={
            "help": "LSTM layers, which QDQ has no int8 form for: int8 weights with inputs quantized at run time "
                    "(ORT's DynamicQuantizeLSTM), or left in float"})
        float_layers: Literal["weights-8bit", "float"] = field(default="weights-8bit", metadata={
            "help": "the layers left computing in float (GRU and RNN, which ONNX Runtime has no int8 kernel for; "
                    "excluded and sensitive nodes; LSTMs with lstm=float): their weights stored as 8-bit, a scale per "
                    "output channel, restored when ONNX Runtime loads the model; or left as they are"})

        def __post_init__(self) -> None:  # (see PassConfig)
            if not 0 < self.percentile <= 100:
                raise ValueError(f"percentile must be above 0 and at most 100, not {self.percentile}")
            if self.samples < 1 or self.auto_exclude < 0:
                raise ValueError("samples must be 1 or more, auto_exclude 0 or more")

    @quiet_ort_quantizer()
    def run(self, model, config, workdir):
        import onnx

        if config.calibration is None:
            raise ConfigError(f"{self.name} {NO_CALIBRATION}")
        quantizable = config.op_types or (STATIC_OPS + ("LSTM",) if config.lstm == "dynamic" else STATIC_OPS)
        candidates = _require_weighted_nodes(model, quantizable)
        data = load_dataset(config.calibration).head(config.samples)
        feeds = evaluate.bind(data, model.load(threads=1))
        out = output_path(workdir, model, "static")
        if config.per_channel:  # DequantizeLinear's axis attribute arrived in opset 13
            model = ModelFile(with_opset_at_least(model.path, 13, workdir, "per-channel QDQ"), "onnx")
        model = _with_own_vectors(model, workdir)
        with failing_as(self.name, model), tempfile.TemporaryDirectory(dir=workdir) as tmp:
            cache = Path(tmp) / "ranges"  # calibrate once, reuse for every sensitivity probe
            proto = onnx.load(str(model.path), load_external_data=False)  # (its graph, and its metadata)
            exclude, graph = list(config.exclude), proto.graph
            indices = [n for n in index_nodes(graph) if n not in exclude]
            if indices:
                progress(f"      left in float: {len(indices)} node(s) computing indices (their results go to a "
                         "Cast to an integer type)")
                exclude += indices
            counted = [n for n in counted_nodes(graph) if n not in exclude]
            if counted:
                progress(f"      left in float: {len(counted)} node(s) after a NonZero or NonMaxSuppression (a "
                         "detector's post-processing, on however many boxes it keeps)")
                exclude += counted
            decode = [n for n in decode_nodes(proto) if n not in exclude]
            if decode:
                progress(f"      left in float: {len(decode)} node(s) of an Ultralytics detector's decode, after its "
                         "last layer (boxes in pixels and scores from 0 to 1, joined into one output)")
                exclude += decode
            infinite = [n for n in unbounded_nodes(model.path, feeds, Path(tmp)) if n not in exclude]
            if infinite:
                progress(f"      left in float: {len(infinite)} node(s) writing or reading infinite values "
                         "(an attention mask's -inf or -3.4e38, a Log of 0)")
                exclude += infinite
            if config.auto_exclude > 0:
                ranked = sensitivity(model, config, feeds, [n for n, op in candidates
                                                            if n not in exclude and op != "LSTM"], Path(tmp), cache)
                exclude += [name for name, _ in ranked[:config.auto_exclude]]
            _quantize_static(model.path, out, config, feeds, cache, exclude=exclude)
            lstms = [n for n, op in candidates if op == "LSTM" and n not in exclude]
            if lstms and config.lstm == "dynamic":
                progress(f"      {len(lstms)} LSTM node(s): int8 weights, inputs quantized at run time (QDQ has "
                         "no int8 LSTM)")
                _quantize_dynamic(out, out, exclude)
            recurrent, others = _store_float_layer_weights(out) if config.float_layers == "weights-8bit" else (0, 0)
            _say_float_recurrent(model.path, recurrent > 0)
            if others:
                progress(f"      {others} weight tensor(s) of layers left in float stored as 8-bit, their compute "
                         "staying float")
        return ModelFile(out, "onnx")


def _store_float_layer_weights(path: Path) -> tuple[int, int]:
    """The weights of the layers that compute in float in the quantized model at *path* stored as
    8-bit, a scale per output channel, in place; how many of them GRUs and RNNs read, how many
    other layers. Left float, a speech model's GRU kept int8-static at 0.95x the size, and the two
    sensitive nodes int8-static-safe leaves in float the small CNN at 0.91x (0.27x stored)."""
    import onnx

    proto = onnx.load(str(path))
    recurrent = store_params_as_uint8(proto, MIN_ELEMENTS, frozenset(RECURRENT_FLOAT), per_channel=True)
    others = store_params_as_uint8(proto, MIN_ELEMENTS, _FLOAT_LAYERS, per_channel=True)
    if recurrent or others:
        onnx.save(proto, str(path))
    return recurrent, others


# ops whose third input ORT's QDQ quantizer quantizes as a bias (to int32, scaled by the other two)
_BIASED = {"Conv", "ConvTranspose", "Gemm", "InstanceNormalization", "LayerNormalization", "BatchNormalization"}


def _with_own_vectors(model: ModelFile, workdir: Path) -> ModelFile:
    """The model with a copy, for each node that reads it, of a bias several nodes read whose copies
    ORT would name as values already there. ORT's static quantizer copies such a bias itself, as
    <name><n> for the next free number among initializers only: torch.export names its values val_1,
    val_2…, and bias val_11's copy was val_117, a value already there; the quantized model did not
    load. Any other model is left as it is."""
    import onnx

    graph = onnx.load(str(model.path), load_external_data=False).graph  # (names only: weights not read)
    readers = Counter(node.input[2] for node in graph.node if node.op_type in _BIASED and len(node.input) > 2)
    inits, values = [i.name for i in graph.initializer], value_names(graph)
    clashing = shared_vectors(graph) & {name for name, count in readers.items()
                                        if count > 1 and values & set(_ort_copy_names(name, count, inits))}
    if not clashing:
        return model
    proto = onnx.load(str(model.path))
    own_small_constants(proto, clashing)
    out = output_path(workdir, model, "own")
    onnx.save(proto, str(out))
    return ModelFile(out, "onnx")


def _ort_copy_names(name: str, readers: int, initializers: list[str]) -> list[str]:
    """The names ORT's quantizer gives the copies of a bias *readers* nodes read: <name><n> for the
    numbers after the largest one an initializer named <name><n> has (onnx_model's
    get_largest_initializer_name_suffix)."""
    numbers = []
    for other in initializers:
        if other.startswith(name):
            try:
                numbers.append(int(other[len(name):]))
            except ValueError:
                continue
    first = max(numbers, default=-1) + 1
    return [f"{name}{first + k}" for k in range(readers - 1)]


def unbounded_nodes(path: Path, feeds, tmp: Path) -> list[str]:
    """Names of the nodes that write or read a float tensor holding ±inf, NaN or a value beyond
    UNBOUNDED on the calibration inputs: a causal attention mask (-inf, or -3.4e38, where a token may
    not look, added to the scores before Softmax), a Log of 0. int8 has no infinity — calibrated, such
    a tensor's range is infinite or vast and its scale garbage — and ORT's entropy and percentile
    calibrators stop on it ("supplied range of [-inf, inf] is not finite", "Too many bins for data
    range"); these nodes stay float."""
    import onnx

    proto = onnx.load(str(path))
    graph = proto.graph
    listed = {o.name for o in graph.output}
    for node in graph.node:  # every value as an output (a name is enough: ORT works out the type)
        for name in node.output:
            if name and name not in listed:
                graph.output.append(onnx.ValueInfoProto(name=name))
                listed.add(name)
    probe = tmp / "every_value.onnx"
    onnx.save(proto, str(probe), save_as_external_data=proto.ByteSize() > 2**31 - 2**20)
    infinite: set[str] = set()
    try:
        runtime = ModelFile(probe, "onnx").load(threads=1)
        for batch in feeds.batches(1):  # (every value of a call is held at once: one sample's at a time)
            for name, value in runtime.run(batch).items():
                if name not in infinite and isinstance(value, np.ndarray) and value.dtype.kind == "f" \
                        and not (np.abs(value.astype(np.float32, copy=False)) < UNBOUNDED).all():  # (NaN too)
                    infinite.add(name)
    except ModelError:  # a value ORT will not hand out: the model is quantized as it would have been
        return []
    finally:
        probe.unlink()
    return [node.name for node in graph.node if node.name and node.op_type != "Constant"
            and infinite.intersection([*node.input, *node.output])]


def sensitivity(model: ModelFile, config, feeds, nodes: list[str], tmp: Path, cache: Path
                ) -> list[tuple[str, float]]:
    """Nodes ranked by how much quantizing each one alone moves the model's outputs (most first):
    1 - cosine similarity to the float outputs on up to 64 calibration samples."""
    probe = _probe_feeds(feeds, 64)
    reference = _run(model.path, probe)
    scores = []
    for i, node in enumerate(nodes):
        if i % max(1, len(nodes) // 5) == 0:
            progress(f"      sensitivity: node {i + 1}/{len(nodes)}")
        path = tmp / f"probe{i}.onnx"
        _quantize_static(model.path, path, config, feeds, cache, only=[node])
        forget_counted_sizes_in(path)
        scores.append((node, _distance(reference, _run(path, probe))))
    return sorted(scores, key=lambda s: -s[1])


def _quantize_static(source: Path, dest: Path, config, feeds, cache: Path, *, exclude=(), only=None) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[config.method]
    if config.method != "minmax" and not cache.exists():
        calibrate_histograms(source, cache, config, feeds)
    with warnings.catch_warnings():
        # ORT works out scales for every calibrated tensor, also those of nodes left in float (a Log
        # of 0 in index arithmetic has range -inf), and numpy warns; the fidelity check judges the result.
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="onnxruntime.quantization")
        quantize_static(str(source), str(dest), CalibrationReader(feeds), quant_format=QuantFormat.QDQ,
                        per_channel=config.per_channel, reduce_range=config.reduce_range,
                        activation_type=QuantType.QUInt8 if config.activations == "uint8" else QuantType.QInt8,
                        weight_type=QuantType.QInt8, calibrate_method=method,
                        op_types_to_quantize=list(config.op_types) or None, nodes_to_quantize=only,
                        nodes_to_exclude=list(exclude) or None,
                        calibration_cache_path=str(cache))


def _probe_feeds(feeds, count: int):
    return [feeds.sample(i) for i in range(min(count, len(feeds)))]


def _run(path: Path, probe: list[dict]) -> dict[str, list[np.ndarray]]:
    runtime = ModelFile(path, "onnx").load(threads=1)
    calls = [runtime.run(f) for f in probe]
    return {o.name: [np.asarray(call[o.name]) for call in calls] for o in runtime.outputs}


def _distance(reference: dict[str, list[np.ndarray]], other: dict[str, list[np.ndarray]]) -> float:
    """1 - cosine similarity of the worst output; of detections (outputs whose size depends on the
    input), 1 - the share that pair with the original's, or of their cosine, whichever is worse."""
    worst, ragged = 0.0, [name for name, values in reference.items()
                          if len({v.shape for v in (*values, *other[name])}) > 1]
    for name in reference.keys() - set(ragged):
        a = np.concatenate([v.ravel() for v in reference[name]]).astype(np.float64)
        b = np.concatenate([v.ravel() for v in other[name]]).astype(np.float64)
        denom = np.linalg.norm(a) * np.linalg.norm(b)
        worst = max(worst, 0.0 if denom == 0 else 1.0 - float(a @ b / denom))
    if ragged:
        rows = compare_detections({n: as_objects(reference[n]) for n in ragged},
                                  {n: as_objects(other[n]) for n in ragged})
        worst = max(worst, 1.0 - rows.agreement, 1.0 - rows.cosine)
    return worst


def _require_weighted_nodes(model: ModelFile, op_types: tuple[str, ...]) -> list[tuple[str, str]]:
    import onnx

    graph = onnx.load(str(model.path), load_external_data=False).graph
    nodes = weighted_nodes(graph, op_types)
    if nodes and float16_weights(graph):  # (ORT's quantizers would write a graph that does not load)
        raise NotApplicable(f"{model.path.name}: ONNX Runtime's quantizers take float32 weights"
                            + quantized_already(graph))
    if not nodes:
        raise NotApplicable(f"{model.path.name} has no node with constant weights that this quantizer "
                            f"handles ({', '.join(op_types)})" + quantized_already(graph))
    return nodes
