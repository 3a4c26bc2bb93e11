"""The edge between edgefleet and onnx/onnxruntime.quantization: logging, file names, graph facts."""

from __future__ import annotations

import contextlib
import importlib
import logging
import re
from collections import Counter
from pathlib import Path

from device_agent.errors import NotApplicable
from device_agent.runtime.base import first_line
from host_tools.compress.model import ModelFile

# Ops with weights that ORT's int8 quantizers turn into integers (dynamic: IntegerOps plus
# Gather; static QDQ: its registry); the rest only carry activations.
DYNAMIC_OPS = ("Conv", "MatMul", "Gemm", "Attention", "LSTM", "Gather")
STATIC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Gather")


@contextlib.contextmanager
def quiet_ort_quantizer():
    """While inside (or around a decorated function): ORT's quantizer logs progress and warnings
    through the root logger, and its sessions warn about unused initializers on stderr; keep the
    terminal ours. The root logger's level is put back after, so the program that ran the pass
    (the agent beside it in a test process, an application using host_tools.compress) keeps its
    own warnings."""
    import onnxruntime

    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    onnxruntime.set_default_logger_severity(3)
    try:
        yield
    finally:
        root.setLevel(level)


def import_leaving_logging_alone(module: str):
    """*module*, imported with what its import does to the root logger undone: ORT's
    matmul_nbits_quantizer calls logging.basicConfig(level=INFO) when imported, which gives the root
    logger a handler of its own and lowers its level."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        return importlib.import_module(module)
    finally:
        root.setLevel(level)
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)


@contextlib.contextmanager
def held_log_errors(logger_name: str):
    """What *logger_name* logs at ERROR while inside, kept instead of printed, one line a record (a
    logged traceback's last: the exception). ORT's quantization pre-processing logs a failed step
    with its traceback and goes on without it."""
    held: list[str] = []

    class Hold(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines = record.getMessage().strip().splitlines()
            held.append(lines[-1] if lines else "")

    logger = logging.getLogger(logger_name)
    handler, propagate = Hold(logging.ERROR), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield held
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def session_crash(path: Path) -> str | None:
    """How ONNX Runtime died creating a session for *path* in a child process ("signal 11"), or
    None when it did not. Some float16 graphs crash ORT 1.32's CPU graph optimizations outright (a
    Transpose, Reshape, Transpose, MatMul chain after an LSTM trips its NCHWc layout transformer);
    in the compress process that would take every result with it. Errors ORT raises are not
    crashes: the evaluation reports those."""
    import signal
    import subprocess
    import sys

    probe = ("import sys; from pathlib import Path; from device_agent.runtime.onnx import OnnxRuntime\n"
             "try:\n    OnnxRuntime(Path(sys.argv[1]))\nexcept Exception:\n    pass")
    try:
        done = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, timeout=600)
    except subprocess.TimeoutExpired:
        return "no session after 600 s"
    if done.returncode >= 0:
        return None
    try:
        return f"{signal.Signals(-done.returncode).name}, signal {-done.returncode}"
    except ValueError:
        return f"signal {-done.returncode}"


def output_path(workdir: Path, model: ModelFile, tag: str) -> Path:
    return Path(workdir) / f"{model.path.stem}.{tag}.onnx"


# Ops only a quantized graph has (QDQ, QOperator, dynamic int8, int4 weight-only).
QUANTIZED_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
                 "MatMulInteger", "ConvInteger", "MatMulNBits", "QGemm", "QAttention", "DynamicQuantizeMatMul")
# of those, the ones whose graph ONNX Runtime computes in int8 (a DequantizeLinear of stored
# weights alone computes in float; MatMulNBits dequantizes its 4-bit weights): the QOperator ops,
# the dynamic ones, quantized activations (QDQ), and the com.microsoft fusions of them (QGemm,
# QAttention, DynamicQuantizeMatMul) that ONNX Runtime's quantizer writes for Gemm and attention
INT8_ARITHMETIC_OPS = ("ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul", "DynamicQuantizeLinear",
                       "QuantizeLinear", "QGemm", "QAttention", "DynamicQuantizeMatMul")


def computes_in_int8(graph) -> bool:
    """Whether ONNX Runtime runs some of *graph*'s arithmetic in 8-bit integers."""
    return any(node.op_type in INT8_ARITHMETIC_OPS for node in graph.node)


def quantized_already(graph) -> str:
    """'' for a float32 graph; else what says it is quantized (", quantized already (15 DequantizeLinear,
    7 QuantizeLinear nodes): compress the float model"), float16 (", its weights are float16:
    onnx-preprocess before this pass widens them to float32", as every int8 recipe has it) or stored
    as 8-bit by onnx-int8-params, to end a pass's reason for not applying."""
    found = Counter(node.op_type for node in graph.node if node.op_type in QUANTIZED_OPS)
    if not found and float16_weights(graph):
        return ", its weights are float16: onnx-preprocess before this pass widens them to float32"
    if not found and (stored := stored_as_8_bit(graph)):
        return f", {stored} of its weight tensors are stored as 8-bit already: compress the float model"
    if not found:
        return ""
    listed = ", ".join(f"{n} {op}" for op, n in found.most_common(3))
    return f", quantized already ({listed} node{'s' * (sum(found.values()) != 1)}): compress the float model"


def float16_weights(graph) -> bool:
    """Whether every weight (rank 2 or more) of *graph* is float16."""
    return {i.data_type for i in graph.initializer if len(i.dims) >= 2} == {10}  # TensorProto.FLOAT16


def stored_as_8_bit(graph) -> int:
    """How many of *graph*'s weights (rank 2 or more) are uint8 read by a Cast: 8-bit storage as
    onnx-int8-params and onnx-weight-only write it, restored to float when the model is loaded."""
    uint8 = {i.name for i in graph.initializer if i.data_type == 2 and len(i.dims) >= 2}  # TensorProto.UINT8
    return len({name for node in graph.node if node.op_type == "Cast" for name in node.input if name in uint8})


def weighted_nodes(source, op_types) -> list[tuple[str, str]]:
    """(name, op type) of the nodes of *op_types* that have a constant weight (an initializer of
    rank 2 or more among their inputs); *source* is a model file, or its graph loaded already."""
    graph = graph_of(source)
    weights = {i.name for i in graph.initializer if len(i.dims) >= 2}
    return [(n.name, n.op_type) for n in graph.node
            if n.op_type in op_types and any(i in weights for i in n.input)]


def graph_of(source):
    """The graph of *source*: a model file (read without its external weights), or a graph already."""
    import onnx

    return onnx.load(str(source), load_external_data=False).graph if isinstance(source, (str, Path)) else source


def index_nodes(source) -> list[str]:
    """Names of the nodes whose results only go to a Cast to an integer type, directly or through
    other such nodes: float arithmetic that computes indices (T5's relative-position buckets:
    Div, Log, Mul, then Cast to int64 and Gather). Calibrated int8 there rounds an index to a
    different one, or to garbage; they stay in float. *source*: a model file, or its graph."""
    import onnx

    graph = graph_of(source)
    readers = consumers(graph)
    integer = {onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
               onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32,
               onnx.TensorProto.UINT64, onnx.TensorProto.BOOL}
    sinks = {id(n) for n in graph.node
             if n.op_type == "Cast" and any(a.name == "to" and a.i in integer for a in n.attribute)}
    outputs = {o.name for o in graph.output}
    found: set[int] = set()
    changed = True
    while changed:  # readers come after their producers: one pass backwards finds nearly all
        changed = False
        for node in reversed(graph.node):
            if id(node) in found or id(node) in sinks or any(o in outputs for o in node.output):
                continue
            read_by = [r for o in node.output for r in readers.get(o, [])]
            if read_by and all(id(r) in sinks or id(r) in found for r in read_by):
                found.add(id(node))
                changed = True
    return [n.name for n in graph.node if id(n) in found and n.name]


def counted_nodes(source) -> list[str]:
    """Names of the nodes that compute on what follows a NonZero, NonMaxSuppression, Unique or
    Compress (COUNTING_OPS), and of those in their If or Loop bodies, but for layers with weights (a
    two-stage detector's box head): a detector's post-processing, box arithmetic on however many
    boxes it kept. Static int8 leaves them in float: a box's coordinates lose what int8 rounds off,
    the saving is nil (no weights, few values), and ONNX Runtime 1.32 crashed (SIGSEGV) running
    torchvision's RetinaNet quantized so, with no boxes. *source*: a model file, or its graph."""
    graph = graph_of(source)
    counted = _counted_values(graph)
    weights = {i.name for i in graph.initializer if len(i.dims) >= 2}
    names = []
    for node in graph.node:
        if counted.intersection(node.output) and not weights.intersection(node.input):
            names.append(node.name)
            names += [inner.name for a in node.attribute if a.type == 5 for inner in a.g.node]
    return [name for name in names if name]


def consumers(graph) -> dict[str, list]:
    """tensor name -> the nodes that read it."""
    found: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            found.setdefault(name, []).append(node)
    return found


def sort_topologically(graph) -> bool:
    """Put the nodes of *graph* in an order where each comes after the nodes it reads, as ONNX
    requires (ONNX Runtime loads graphs that are not, and its float16 converter writes its Casts
    last), moving as few as it can: a node waits only until what it reads is made. A graph in order,
    or with subgraphs (which read outer names unseen), is left as it is. Returns whether it changed."""
    nodes = list(graph.node)
    made = {"", *(i.name for i in graph.initializer), *(v.name for v in graph.input)}
    placed, pending = [], list(range(len(nodes)))
    while pending:
        waiting = []
        for i in pending:
            if all(name in made for name in nodes[i].input):
                placed.append(i)
                made.update(nodes[i].output)
            else:
                waiting.append(i)
        if len(waiting) == len(pending):
            return False  # a cycle, or a name nothing makes
        pending = waiting
    if has_subgraphs(graph) or placed == sorted(placed):
        return False
    copies = [type(nodes[i])() for i in placed]
    for copy, i in zip(copies, placed):
        copy.CopyFrom(nodes[i])
    del graph.node[:]
    graph.node.extend(copies)
    return True


def has_subgraphs(graph) -> bool:
    """Whether a node carries a graph (If, Loop, Scan), which may read the outer graph's names."""
    return any(a.type in (5, 10) for node in graph.node for a in node.attribute)  # AttributeProto GRAPH(S)


def subgraph_reads(graph) -> set[str]:
    """The names the subgraphs of *graph*'s nodes (If, Loop, Scan; nested ones too) read."""
    names: set[str] = set()
    for node in graph.node:
        for a in node.attribute:
            for sub in ([a.g] if a.type == 5 else list(a.graphs) if a.type == 10 else []):
                names |= {name for inner in sub.node for name in inner.input} | subgraph_reads(sub)
    return names


def default_opset(proto) -> int:
    """The opset version of the default (ai.onnx) domain a model imports."""
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)


def with_opset_at_least(path: Path, opset: int, workdir: Path, why: str) -> Path:
    """*path* itself if its default-domain opset is at least *opset*, else a converted copy."""
    import onnx
    from onnx import version_converter

    model = onnx.load(str(path))
    current = default_opset(model)
    if current >= opset:
        return path
    try:
        converted = version_converter.convert_version(model, opset)
    except Exception as exc:  # the converter raises its own C++ errors for ops it cannot lift
        raise NotApplicable(f"{why} needs opset {opset}; {path.name} has {current} and the ONNX version "
                            f"converter cannot lift it: {first_line(exc)}") from None
    out = Path(workdir) / f"{path.stem}.opset{opset}.onnx"
    onnx.save(converted, str(out))
    return out


def typed_by_ort(model) -> int:
    """Give the values of *model* (a ModelProto, changed in place) that ONNX's type inference leaves
    untyped the types ONNX Runtime gives them, then infer again from there; returns how many were
    given. ONNX has no inference for some ops (ai.onnx.ml's Scaler: a scikit-learn StandardScaler as
    skl2onnx exports it), and once ORT's optimizer removed the Cast after one, nothing downstream had
    a type: ORT's quantizers stopped ("Unable to find data type", and in calibration "Only an
    existing tensor can be modified"), and its float16 converter left a float input of a float16
    Sub without a Cast."""
    import onnx
    import onnxruntime

    graph = onnx.shape_inference.infer_shapes(model).graph
    typed = {v.name for v in (*graph.value_info, *graph.input, *graph.output)} | {i.name for i in graph.initializer}
    untyped = [name for node in graph.node for name in node.output if name and name not in typed]
    if not untyped:
        return 0
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in untyped)
    try:
        session = onnxruntime.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 — a graph ORT cannot load this way stays as it was
        return 0
    elem = {"tensor(float)": onnx.TensorProto.FLOAT, "tensor(float16)": onnx.TensorProto.FLOAT16,
            "tensor(double)": onnx.TensorProto.DOUBLE, "tensor(int64)": onnx.TensorProto.INT64,
            "tensor(int32)": onnx.TensorProto.INT32}
    given = [onnx.helper.make_tensor_value_info(o.name, elem[o.type], None)
             for o in session.get_outputs() if o.name in set(untyped) and o.type in elem]
    model.graph.value_info.extend(given)
    inferred = onnx.shape_inference.infer_shapes(model).graph.value_info
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred)
    return len(given)


def forget_counted_sizes(graph) -> int:
    """Forget the sizes shape inference recorded for the values that follow what the data decides
    the size of (a detector's boxes after NonZero or NonMaxSuppression; ORT's symbolic inference
    names their number), where the inputs' sizes do not make them up; returns how many. Given such
    a name on both sides of a Reshape, ONNX Runtime's optimizer rewrites the Reshape's target as
    [0, -1], which fails on an empty tensor ("cannot be reshaped to the requested shape"): the model
    ran on an image with boxes and failed on one without. (Other recorded sizes stay: without them
    ORT crashes on some float16 graphs, see compact.py.)"""
    inputs = {d.dim_param for v in graph.input for d in v.type.tensor_type.shape.dim if d.dim_param}
    counted = _counted_values(graph)
    forgot = 0
    for value in graph.value_info:
        if value.name not in counted:
            continue
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param and not set(_NAME.findall(dim.dim_param)) <= inputs:
                dim.Clear()
                forgot += 1
    return forgot


# ops whose output's size the data decides
COUNTING_OPS = {"NonZero", "NonMaxSuppression", "Unique", "Compress"}


def _counted_values(graph) -> set[str]:
    """The values of *graph* that a COUNTING_OPS node makes or that follow one (an If or Loop whose
    body holds one counts too), in whatever order the nodes are (the float16 converter's Casts last)."""
    counted: set[str] = set()
    while True:
        before = len(counted)
        for node in graph.node:
            if node.op_type in COUNTING_OPS or counted.intersection(node.input) or any(
                    inner.op_type in COUNTING_OPS for a in node.attribute if a.type == 5 for inner in a.g.node):
                counted.update(node.output)
        if len(counted) == before:
            return counted


def forget_counted_sizes_in(path: Path) -> int:
    """forget_counted_sizes on the model file at *path*, saved again where any went (its external
    weight files, if it has them, untouched). ORT's quantizers infer shapes again, so every ONNX
    pass's output gets this (workflow.apply_pass), and onnx-preprocess's shapes before it optimizes."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    forgot = forget_counted_sizes(proto.graph)
    if forgot:
        onnx.save(proto, str(path))
    return forgot


_NAME = re.compile(r"[A-Za-z_][\w:./]*")  # (a size's name, or the names in an expression of them: 2*batch)
