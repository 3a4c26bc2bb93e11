"""TFLite quantization with litert-quantizer: dynamic-range int8, weight-only int8, full int8
calibrated on the user's data, and fp16 weights.

A full-int8 model keeps float32 inputs and outputs by default: a QUANTIZE in front of each int8
input and a DEQUANTIZE behind each int8 output, inside the model (as TensorFlow's converter does by
default), so callers keep feeding float32 and the interpreter converts in C++. With ``io=int8`` the
int8 tensors themselves are the model's inputs and outputs (for callers that feed quantized data);
edgefleet's TFLite runtime then converts them at the edge in NumPy, which on the reference CNN
cost more than the int8 interpreter's whole call (docs/benchmarks.md). Every pass's output keeps
the original's input and output names.

Full int8 can be slower than float: the interpreter's XNNPACK delegate runs a float graph in one
piece, but not some ops in int8 (of the reference transformer's: ADD, SUB, RSQRT,
SQUARED_DIFFERENCE, GELU, SOFTMAX, BATCH_MATMUL), so an all-int8 transformer falls apart into two
dozen delegate pieces with TFLite's own int8 kernels between them (the reference transformer
2.3-2.7x float's time). ``ops=`` quantizes only the op types named, the others float between a
QUANTIZE and a DEQUANTIZE; ``joining=`` names op types quantized only where they join onto one of
those (a pooling between two int8 convolutions saves a DEQUANTIZE and a QUANTIZE; a layer norm's
mean between float ops would only add a pair), ``between=`` those quantized only with one on both
sides. The ``int8-layers`` recipe quantizes the layers with weights, the pooling, padding,
concatenations and means that join onto them and the depthwise convolutions between them, which
XNNPACK keeps in one piece (the reference transformer 0.6-0.7x float's time; a ResNet as fast as
full int8; --auto tries it too).

litert-quantizer does not know TensorFlow's fused UNIDIRECTIONAL_SEQUENCE_LSTM (a Keras 2 LSTM):
each pass stores those weights afterwards, as ``recurrent`` describes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from device_agent.errors import ConfigError, NotApplicable
from host_tools.compress import yolo
from host_tools.compress.data import Dataset, load_dataset
from host_tools.compress.model import ModelFile
from host_tools.compress.passes import Pass, PassConfig, failing_as, progress, register
from host_tools.compress.recipes import TFLITE_INT8_BETWEEN_OPS, TFLITE_INT8_JOINING_OPS, TFLITE_INT8_LAYER_OPS
from host_tools.compress.tflite import flatbuffer, fold, recurrent
from host_tools.compress.tflite.float_io import float_io, without_round_trips

_OPS_HELP = "regular expression of the tensor names to quantize"
_SCHEMA_NAMES = {"CONV_2D_TRANSPOSE": "TRANSPOSE_CONV"}


@dataclass(frozen=True)
class LayersConfig(PassConfig):
    layers: str = field(default=".*", metadata={"help": _OPS_HELP})


class _LiteRtPass(Pass):
    formats = ("tflite",)
    requires = ("litert_quantizer",)
    extra = "litert"
    tag = ""
    lstm = "hybrid"  # how fused LSTMs' weights are stored afterwards: hybrid, int8 or float16 (recurrent.py)
    widens = True  # float16 weights are widened to float32 first (fold.widened_copy)

    def configure(self, quantizer, config, data: bytes) -> None:
        """Tell *quantizer* what to quantize; *data* is the model it quantizes (its tensor names as it
        sees them)."""
        raise NotImplementedError

    def calibration(self, quantizer, model: ModelFile, config):
        return None

    def kept_float(self, quantizer, model: ModelFile, data: bytes) -> str:
        """Tell *quantizer* what to leave in float, after configure; what, said in a line (or "")."""
        return ""

    def run(self, model, config, workdir):
        from litert_quantizer import quantizer as lq

        out = Path(workdir) / f"{model.path.stem}.{self.tag}.tflite"
        with failing_as(self.name, model):  # (outside _quiet: its line is for the user)
            source = fold.widened_copy(model.path, Path(workdir)) if self.widens else model.path
            done = quantized_weights(source)
        with _quiet(), failing_as(self.name, model):
            if done:  # (litert-quantizer fails on such a model with an AttributeError of its own)
                raise NotApplicable(f"{model.path.name}'s weights are {done} already: compress the float model")
            data = source.read_bytes()
            if flatbuffer.lacks_unique_names(data):  # (litert-quantizer refuses such a model)
                tree, outside = flatbuffer.read(source)
                flatbuffer.unique_names(tree)
                source = Path(workdir) / f"{model.path.stem}.named.tflite"
                flatbuffer.write(tree, outside, source)
                data = source.read_bytes()
            quantizer = lq.Quantizer(str(source))
            self.configure(quantizer, config, data)
            kept = self.kept_float(quantizer, model, data)
            result = quantizer.quantize(self.calibration(quantizer, model, config))
            lstms = recurrent.LSTM_OP in flatbuffer.op_kinds(data)
            if result.quantized_model is None and not lstms:
                raise NotApplicable(f"{model.path.name}: litert-quantizer found nothing to quantize")
            out.write_bytes(data if result.quantized_model is None else bytes(result.quantized_model))
            flatbuffer.restore_io_names(model.path, out)
        if kept:
            progress(f"      left in float: {kept}")
        if lstms:
            with failing_as(self.name, model):  # (outside _quiet: its lines are for the user)
                self._say_lstms(out)
        return ModelFile(out, "tflite")

    def _say_lstms(self, out: Path) -> None:
        stored, left = recurrent.store_weights(out, self.lstm)
        if stored:
            progress(f"      {stored} fused LSTM(s) ({recurrent.LSTM_OP}): weights stored as "
                     f"{'int8, computed as dynamic-range int8' if self.lstm == 'hybrid' else self.lstm}")
        if left:
            progress(f"      left in float: {left} fused LSTM(s) ({recurrent.LSTM_OP}) with peephole or "
                     "projection weights, or weights another op shares")


@register
class TfliteDynamicInt8(_LiteRtPass):
    """int8 weights (dense layers optionally one scale per layer), activations quantized by the kernels."""

    name, tag, lstm = "tflite-dynamic", "dynamic", "hybrid"
    summary = "dynamic-range int8 (int8 weights, float activations quantized by the kernels)"

    @dataclass(frozen=True)
    class Config(LayersConfig):
        per_channel: bool = field(default=True, metadata={
            "help": "one weight scale per output row of fully-connected and batch-matmul layers (litert's "
                    "default); false: one per layer, as ONNX Runtime's quantize_dynamic, 12 bytes less a row "
                    "(7% of the reference transformer's file). Convolutions keep one per channel: TFLite's "
                    "dynamic-range depthwise kernel gives wrong results with one per layer"})
        weight_only: tuple[str, ...] = field(default=(), metadata={
            "help": "op types whose weights are stored int8 but turned back into float (a DEQUANTIZE of the "
                    "constant) and computed in float, e.g. DEPTHWISE_CONV_2D: XNNPACK does not run a "
                    "dynamic-range depthwise convolution, which then splits its graph (MobileNetV2 3.1x "
                    "float's time, 1.3x so)"})

        def __post_init__(self) -> None:  # (see PassConfig)
            _op_type_fields(self, ("weight_only",))

    def configure(self, quantizer, config, data):
        from litert_quantizer.qtyping import QuantGranularity, TFLOperationName

        quantizer.add_dynamic_config(regex=config.layers, operation_name=TFLOperationName.ALL_SUPPORTED, num_bits=8)
        if not config.per_channel:
            for op in (TFLOperationName.FULLY_CONNECTED, TFLOperationName.BATCH_MATMUL):
                quantizer.add_dynamic_config(regex=config.layers, operation_name=op, num_bits=8,
                                             granularity=QuantGranularity.TENSORWISE)
        for op in config.weight_only:
            quantizer.add_weight_only_config(regex=config.layers, operation_name=TFLOperationName[op], num_bits=8)


@register
class TfliteWeightOnlyInt8(_LiteRtPass):
    """int8 weights dequantized before float compute: smallest loss, no speed-up."""

    name, tag, lstm = "tflite-weight-only", "wo8", "int8"
    summary = "int8 weights only, float compute"

    @dataclass(frozen=True)
    class Config(LayersConfig):
        bits: int = field(default=8, metadata={"help": "8 or 4"})

        def __post_init__(self) -> None:  # (see PassConfig)
            if self.bits not in (4, 8):
                raise ValueError(f"bits must be 8 or 4, not {self.bits}")

    def configure(self, quantizer, config, data):
        from litert_quantizer.qtyping import TFLOperationName

        quantizer.add_weight_only_config(regex=config.layers, operation_name=TFLOperationName.ALL_SUPPORTED,
                                         num_bits=config.bits)


@register
class TfliteFullInt8(_LiteRtPass):
    """int8 weights and activations, ranges calibrated on the user's inputs (refuses without)."""

    name, tag, lstm = "tflite-int8", "int8", "hybrid"
    summary = "full int8 (weights and activations), calibrated"

    @dataclass(frozen=True)
    class Config(LayersConfig):
        calibration: Dataset | str | None = field(default=None, metadata={
            "help": "calibration inputs (.npz, folder, loader); default: --calib", "required": True})
        samples: int = field(default=256, metadata={"help": "calibration samples used at most"})
        activation_bits: int = field(default=8, metadata={"help": "8, or 16 for int16 activations"})
        io: str = field(default="float", metadata={
            "help": "float: float32 inputs and outputs, converted inside the model; int8: the int8 tensors"})
        ops: tuple[str, ...] = field(default=(), metadata={
            "help": "op types to quantize (litert-quantizer's names, e.g. FULLY_CONNECTED,CONV_2D), the rest "
                    "left float; default: every op it can quantize"})
        joining: tuple[str, ...] = field(default=(), metadata={
            "help": "op types quantized only where they join onto a quantized op of ops= (its input comes from "
                    "one or its output goes to one, directly or through others of these), e.g. MAX_POOL_2D,MEAN; "
                    "elsewhere float, not int8 between a QUANTIZE and a DEQUANTIZE of their own"})
        between: tuple[str, ...] = field(default=(), metadata={
            "help": "op types quantized only where they join onto quantized ops on both sides (an input from "
                    "one and an output to one), e.g. DEPTHWISE_CONV_2D"})

        def __post_init__(self) -> None:  # (see PassConfig)
            if self.activation_bits not in (8, 16) or self.samples < 1:
                raise ValueError(f"activation_bits must be 8 or 16 (not {self.activation_bits}) and samples 1 "
                                 f"or more (not {self.samples})")
            if self.io not in ("float", "int8"):
                raise ValueError(f"io must be float or int8, not {self.io!r}")
            _op_type_fields(self, ("ops", "joining", "between"),
                            f" (int8-layers quantizes {','.join(TFLITE_INT8_LAYER_OPS)}, joining onto them "
                            f"{','.join(TFLITE_INT8_JOINING_OPS)}, between them {','.join(TFLITE_INT8_BETWEEN_OPS)})")
            for name in ("joining", "between"):
                if getattr(self, name) and (not self.ops or "ALL_SUPPORTED" in self.ops):
                    raise ValueError(f"{name}= needs ops=, the op types to join onto (every op is quantized "
                                     f"without)")

    def run(self, model, config, workdir):
        if config.ops and "ALL_SUPPORTED" not in config.ops:
            present = flatbuffer.op_kinds(model.path.read_bytes())
            if not any(_SCHEMA_NAMES.get(op, op) in present for op in config.ops):
                raise NotApplicable(f"{model.path.name} has no {'/'.join(config.ops)} op to quantize")
        result = super().run(model, config, workdir)
        if config.io == "float":
            tree, outside = flatbuffer.read(result.path)
            if float_io(tree) + without_round_trips(tree):
                flatbuffer.write(tree, outside, result.path)
        return result

    def configure(self, quantizer, config, data):
        from litert_quantizer.qtyping import TFLOperationName

        if config.calibration is None:
            raise ConfigError(f"{self.name} needs calibration data (--calib)")
        for op in [op for op in config.ops or ("ALL_SUPPORTED",) if op != "EMBEDDING_LOOKUP"]:
            quantizer.add_static_config(regex=config.layers, operation_name=TFLOperationName[op],
                                        activation_num_bits=config.activation_bits, weight_num_bits=8)
        joins = (*config.joining, *config.between)
        scope = joins and joining_scope(data, config.ops, config.joining, config.layers, config.between)
        for op in joins if scope else ():
            quantizer.add_static_config(regex=scope, operation_name=TFLOperationName[op],
                                        activation_num_bits=config.activation_bits, weight_num_bits=8)
        if not config.ops or "EMBEDDING_LOOKUP" in config.ops:
            # Its full-int8 policy leaves embedding tables float (a text model's largest weight); an
            # embedding lookup's int8 table is dequantized as it is read, as in dynamic-range int8.
            quantizer.add_dynamic_config(regex=config.layers, operation_name=TFLOperationName.EMBEDDING_LOOKUP,
                                         num_bits=8)

    def kept_float(self, quantizer, model, data):
        """An Ultralytics export's decode, the ops after its last layer (DECODE_ENDS), left in float
        as onnx-static leaves an ONNX export's (yolo.decode_nodes): one int8 scale for the output
        that joins boxes and scores rounds the boxes, and there are no weights there to shrink."""
        from litert_quantizer.algorithm_manager import AlgorithmName
        from litert_quantizer.qtyping import TFLOperationName

        if yolo.metadata(model.path, "tflite").get("task") not in yolo.TASKS:
            return ""
        graph = flatbuffer.operators(data)[0]
        ops = [(kind in DECODE_ENDS, inputs, outputs) for kind, inputs, outputs, _ in graph]
        decode = [b";".join(graph[k][3]).decode(errors="replace") + ";" for k in yolo.after_layers(ops) if graph[k][3]]
        if not decode:
            return ""
        quantizer.update_quantization_recipe(regex="^(?:" + "|".join(map(re.escape, decode)) + ")$",
                                             operation_name=TFLOperationName.ALL_SUPPORTED,
                                             algorithm_key=AlgorithmName.NO_QUANTIZE)
        return f"{len(decode)} op(s) of an Ultralytics detector's decode, after its last layer"

    def calibration(self, quantizer, model, config):
        from ai_edge_litert.interpreter import Interpreter

        signatures = Interpreter(model_path=str(model.path)).get_signature_list()
        if len(signatures) != 1:
            raise NotApplicable(f"{model.path.name} has {len(signatures)} signatures; full int8 calibration "
                                f"needs exactly one")
        loops = _control_flow(model.path)
        if loops:  # (litert-quantizer's calibration stops inside it: "Tensor data is null")
            raise NotApplicable(f"{model.path.name} has control flow ({loops}), which litert-quantizer's full int8 "
                                f"calibration cannot run; int8-dynamic and int8-weights apply")
        key, signature = next(iter(signatures.items()))
        runtime = model.load(threads=1)
        feeds = load_dataset(config.calibration).head(config.samples).bind(runtime.inputs)
        # The interpreter's tensor names (what Dataset binds to) in signature order.
        by_tensor = dict(zip([s.name for s in runtime.inputs], signature["inputs"]))
        samples = [{by_tensor[name]: value for name, value in feeds.sample(i).items()} for i in range(len(feeds))]
        return quantizer.calibrate({key: samples})


DECODE_ENDS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV")  # its layers: the decode follows


def joining_scope(data: bytes, ops: tuple[str, ...], joining: tuple[str, ...], layers: str = ".*",
                  between: tuple[str, ...] = ()) -> str:
    """A litert-quantizer scope regex (it matches an op by its output tensor names, "a;b;") for the
    ops of a *joining* type that join onto an op of an *ops* type (one whose input comes from such an
    op or whose output goes to one, directly or through other joining ops), and of a *between* type
    whose input comes from one of those and whose output goes to one. "" when none does.

    A pooling or a mean between two int8 convolutions saves their DEQUANTIZE and QUANTIZE; one
    between float ops (a layer norm's means) would only add a pair of its own around it. A depthwise
    convolution with a conversion left on one side only trades its float kernel for its int8 one,
    which for XNNPACK's 7x7 is the slower (a ConvNeXt's)."""
    # (an embedding lookup's table is int8 but its output float: dequantized as it is read)
    core_kinds = {_SCHEMA_NAMES.get(op, op) for op in ops} - {"EMBEDDING_LOOKUP"}
    both_kinds = {_SCHEMA_NAMES.get(op, op) for op in between}
    join_kinds = {_SCHEMA_NAMES.get(op, op) for op in joining} - both_kinds
    scopes = set()
    for graph in flatbuffer.operators(data):
        def scope(k: int) -> str:
            return b";".join(graph[k][3]).decode(errors="replace") + ";"

        made_by = {t: k for k, (_, _, outputs, _) in enumerate(graph) for t in outputs}
        used_by: dict[int, list[int]] = {}
        for k, (_, inputs, _, _) in enumerate(graph):
            for t in inputs:
                used_by.setdefault(t, []).append(k)

        def before(k: int) -> list[int]:
            return [made_by[t] for t in graph[k][1] if t in made_by]

        def after(k: int) -> list[int]:
            return [j for t in graph[k][2] for j in used_by.get(t, ())]

        def chosen(kinds: set[str]) -> set[int]:
            return {k for k, op in enumerate(graph) if op[0] in kinds and op[3] and re.search(layers, scope(k))}

        core, joins, betweens = chosen(core_kinds), chosen(join_kinds), chosen(both_kinds)
        joined, reached = set(), list(core)
        while reached:  # the joining ops reached from the core, directly or through each other
            k = reached.pop()
            for j in (*before(k), *after(k)):
                if j in joins and j not in joined:
                    joined.add(j)
                    reached.append(j)
        int8 = core | joined
        joined |= {k for k in betweens if int8.intersection(before(k)) and int8.intersection(after(k))}
        scopes.update(scope(k) for k in joined)
    return "^(?:" + "|".join(re.escape(s) for s in sorted(scopes)) + ")$" if scopes else ""


def _op_type_fields(config, fields: tuple[str, ...], hint: str = "") -> None:
    """Op type names in *config*'s *fields*, as typed (any case), made litert-quantizer's (upper case);
    one it does not know is a ValueError naming the field, with *hint* after it."""
    for name in fields:
        object.__setattr__(config, name, tuple(op.upper() for op in getattr(config, name)))
    known = _litert_op_names()
    unknown = [op for name in fields for op in getattr(config, name) if known is not None and op not in known]
    if unknown:
        where = next(name for name in fields if unknown[0] in getattr(config, name))
        raise ValueError(f"{where}: litert-quantizer knows no op type {', '.join(unknown)}{hint}")


def _litert_op_names() -> frozenset[str] | None:
    """The op type names litert-quantizer takes (None when it is not installed: the pass's
    requirement check says so before anything runs)."""
    try:
        from litert_quantizer.qtyping import TFLOperationName
    except ImportError:
        return None
    return frozenset(TFLOperationName.__members__)


def _control_flow(path: Path) -> str:
    """The control-flow ops of a TFLite model, as "WHILE, IF" (a Keras LSTM converted by TensorFlow
    loops over its steps in a WHILE), or "". (A loop body's own ops run only from a loop in the main
    graph, so listing the whole model's finds what listing the main graph's did.)"""
    return ", ".join(sorted(flatbuffer.op_kinds(path.read_bytes()) & {"WHILE", "IF", "CALL_ONCE"}))


@register
class TfliteFp16(_LiteRtPass):
    """float16 weights (cast back to float for compute on CPUs; GPU delegates run them natively)."""

    name, tag, lstm, widens = "tflite-fp16", "fp16", "float16", False
    summary = "float16 weights"
    Config = LayersConfig

    def configure(self, quantizer, config, data):
        from litert_quantizer.algorithm_manager import AlgorithmName
        from litert_quantizer.qtyping import TFLOperationName

        quantizer.add_weight_only_config(regex=config.layers, operation_name=TFLOperationName.ALL_SUPPORTED,
                                         num_bits=16, algorithm_key=AlgorithmName.FLOAT_CASTING)


# TFLite TensorType -> name, for the weights a quantized model stores
_WEIGHT_TYPES = {0: "float32", 1: "float16", 3: "uint8", 7: "int16", 9: "int8", 17: "int4"}
_WEIGHTED = {"CONV_2D": 1, "DEPTHWISE_CONV_2D": 1, "FULLY_CONNECTED": 1, "TRANSPOSE_CONV": 1, "CONV_3D": 1,
             recurrent.LSTM_OP: recurrent.WEIGHTS[0]}


def quantized_weights(path: Path) -> str:
    """'' when some weight of a weighted op is float32; else what its weights are ("int8 (4 of 4)"),
    a float16 weight counted where a DEQUANTIZE turns it into the float32 the op reads."""
    from host_tools.compress.tflite.graph import Graph

    g = Graph(flatbuffer.read(path)[0])
    made_by = {int(t): k for k, op in enumerate(g.ops) for t in op.outputs}
    kinds = []
    for k, kind in enumerate(g.kinds):
        if kind not in _WEIGHTED or g.input(k, _WEIGHTED[kind]) < 0:
            continue
        t = g.input(k, _WEIGHTED[kind])
        if t in made_by and g.kinds[made_by[t]] == "DEQUANTIZE":
            t = g.input(made_by[t], 0)
        kinds.append(_WEIGHT_TYPES.get(g.tensor(t).type, "other"))
    if not kinds or "float32" in kinds:
        return ""
    top, n = Counter(kinds).most_common(1)[0]
    return f"{top} ({n} of {len(kinds)})"


@contextlib.contextmanager
def _quiet():
    """litert-quantizer prints sizes and a calibration progress bar, and logs through absl."""
    previous = logging.getLogger("absl").level
    logging.getLogger("absl").setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its calibration interpreter warns that it keeps all tensors
            yield
    finally:
        logging.getLogger("absl").setLevel(previous)
