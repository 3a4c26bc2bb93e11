"""The edge between edgefleet and onnx/onnxruntime.quantization: logging, file names, graph facts."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
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
    7 QuantizeLinear nodes): compress the float model"), float16 (", its weights are float16
    already: compress the float32 model") or stored as 8-bit by onnx-int8-params, to end a pass's
    reason for not applying."""
    found = Counter(node.op_type for node in graph.node if node.op_type in QUANTIZED_OPS)
    weights = {i.data_type for i in graph.initializer if len(i.dims) >= 2}
    if not found and weights == {10}:  # TensorProto.FLOAT16
        return ", its weights are float16 already: compress the float32 model"
    if not found and (stored := stored_as_8_bit(graph)):
        return f", {stored} of its weight tensors are stored as 8-bit already: compress the float model"
    if not found:
        return ""
    listed = ", ".join(f"{n} {op}" for op, n in found.most_common(3))
    return f", quantized already ({listed} node{'s' * (sum(found.values()) != 1)}): compress the float model"


def stored_as_8_bit(graph) -> int:
    """How many of *graph*'s weights (rank 2 or more) are uint8 read by a Cast: 8-bit storage as
    onnx-int8-params and onnx-weight-only write it, restored to float when the model is loaded."""
    uint8 = {i.name for i in graph.initializer if i.data_type == 2 and len(i.dims) >= 2}  # TensorProto.UINT8
    return len({name for node in graph.node if node.op_type == "Cast" for name in node.input if name in uint8})


def weighted_nodes(path: Path, op_types) -> list[tuple[str, str]]:
    """(name, op type) of the nodes of *op_types* that have a constant weight (an initializer of
    rank 2 or more among their inputs)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {i.name for i in graph.initializer if len(i.dims) >= 2}
    return [(n.name, n.op_type) for n in graph.node
            if n.op_type in op_types and any(i in weights for i in n.input)]


def index_nodes(path: Path) -> list[str]:
    """Names of the nodes whose results only go to a Cast to an integer type, directly or through
    other such nodes: float arithmetic that computes indices (T5's relative-position buckets:
    Div, Log, Mul, then Cast to int64 and Gather). Calibrated int8 there rounds an index to a
    different one, or to garbage; they stay in float."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
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


def drop_initializer_inputs(model) -> int:
    """Older exporters (IR < 4) list every initializer as a graph input too; optimizers then treat
    them as inputs a caller must feed. Keep only the real inputs; returns how many went."""
    initializers = {i.name for i in model.graph.initializer}
    extra = [i for i in model.graph.input if i.name in initializers]
    for value in extra:
        model.graph.input.remove(value)
    if extra and model.ir_version < 4:
        model.ir_version = 4
    return len(extra)


def hoist_constants(model) -> int:
    """Turn Constant nodes that hold a tensor into initializers (as exporters often write weights),
    so quantizers see the weights; returns how many moved."""
    graph = model.graph
    moved = []
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            graph.initializer.append(_renamed_copy(node.attribute[0].t, node.output[0]))
            moved.append(node)
    for node in moved:
        graph.node.remove(node)
    return len(moved)


def inline_constant_identities(model) -> int:
    """Remove Identity nodes that copy an initializer; returns how many went. PyTorch's exporter
    writes them for equal constants, e.g. the biases of BatchNorms folded into convolutions: a
    vector gets a copy of its own, so that each layer's parameter can change on its own. And it
    writes them for a weight that one layer applied twice shares (ALBERT): a weight matrix's
    readers read the one weight, so that pruning sees it shared (pruning its copies apart would
    store it twice)."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    inlined = [n for n in graph.node if n.op_type == "Identity" and n.input and n.input[0] in inits]
    shared: dict[str, str] = {}
    outputs, subgraphs = {o.name for o in graph.output}, has_subgraphs(graph)  # names left as they are
    for node in inlined:
        source = inits[node.input[0]]
        if len(source.dims) >= 2 and not subgraphs and node.output[0] not in outputs:
            shared[node.output[0]] = source.name
        else:
            graph.initializer.append(_renamed_copy(source, node.output[0]))
        graph.node.remove(node)
    for node in graph.node:
        node.input[:] = [shared.get(name, name) for name in node.input]
    drop_unused_initializers(graph, {node.input[0] for node in inlined})
    return len(inlined)


def share_equal_initializers(graph) -> int:
    """Initializers equal in type, shape and value become one, read by all their readers; returns
    how many went. The undoing of inline_constant_identities where a copy stayed as it was: a weight
    the exporter shared between layers (ALBERT's repeated layer) is stored once again."""
    from onnx import TensorProto, numpy_helper

    if has_subgraphs(graph):  # their nodes may read the outer names; not worth following
        return 0
    fixed = {v.name for v in (*graph.input, *graph.output)}
    first: dict[tuple, str] = {}
    same: dict[str, str] = {}
    for init in graph.initializer:
        if init.name in fixed or init.data_location == TensorProto.EXTERNAL:
            continue
        value = numpy_helper.to_array(init)
        key = (init.data_type, tuple(init.dims), hashlib.sha256(value.tobytes()).digest())
        if key in first:
            same[init.name] = first[key]
        else:
            first[key] = init.name
    if same:
        for node in graph.node:
            node.input[:] = [same.get(name, name) for name in node.input]
        drop_unused_initializers(graph, set(same))
    return len(same)


def drop_unused_initializers(graph, names: set[str]) -> None:
    """Remove the initializers among *names* that no node, graph output or graph input names any more."""
    used = {name for node in graph.node for name in node.input} | {v.name for v in (*graph.output, *graph.input)}
    for init in [i for i in graph.initializer if i.name in names and i.name not in used]:
        graph.initializer.remove(init)


def _renamed_copy(tensor, name: str):
    copy = type(tensor)()
    copy.CopyFrom(tensor)
    copy.name = name
    return copy


# TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16: the initializers that hold weights (and train)
FLOAT_TYPES = (1, 10, 11, 16)


def _own_shape_concats(graph, taken: set[str]) -> int:
    """A Concat of constants and sizes read at run time that is the target shape of several Reshapes
    or Expands: each of them after the first gets a copy of it, put right after it. (ONNX Runtime
    merges equal nodes again when it loads the model.)"""
    shaped: dict[str, list] = {}
    for node in graph.node:
        if node.op_type in ("Reshape", "Expand") and len(node.input) > 1:
            shaped.setdefault(node.input[1], []).append(node)
    copies = 0
    for concat in [n for n in graph.node if n.op_type == "Concat" and len(shaped.get(n.output[0], [])) > 1]:
        at = list(graph.node).index(concat)
        for k, reader in enumerate(shaped[concat.output[0]][1:], start=1):
            clone = type(concat)()
            clone.CopyFrom(concat)
            clone.output[0] = fresh_name(concat.output[0], taken)
            clone.name = f"{concat.name}.{k}" if concat.name else ""
            graph.node.insert(at + k, clone)
            reader.input[1] = clone.output[0]
            copies += 1
    return copies


def whole_shapes(model) -> int:
    """Shape(x, start=0), as torch.export writes every read of a whole shape, as Shape(x): the same
    value, in the one form the pruning planner looks for; returns how many."""
    count = 0
    for node in model.graph.node:
        if node.op_type == "Shape" and node.attribute and \
                all(a.name == "start" and a.i == 0 for a in node.attribute):
            del node.attribute[:]
            count += 1
    return count


def own_small_constants(model, names: set[str]) -> int:
    """Give each node that reads one of *names* — float vectors (biases, norm scales; at most one axis)
    — its own copy: torch.export's optimizer stores equal constants once, so the zero biases and unit
    LayerNorm scales of layers that have nothing else in common are one initializer. Returns how many
    copies were made; what pruning leaves equal is shared again afterwards (share_equal_initializers)."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer if i.name in names and _float_vector(i)}
    taken = value_names(graph)
    seen: set[str] = set()
    copies = 0
    for index, node in enumerate(graph.node):
        for k, name in enumerate(node.input):
            if name not in inits:
                continue
            if name in seen:
                graph.initializer.append(_renamed_copy(inits[name], fresh_name(f"{name}.{node.name or index}", taken)))
                node.input[k] = graph.initializer[-1].name
                copies += 1
            seen.add(name)
    return copies


def shared_vectors(graph) -> set[str]:
    """Float initializers of at most one axis (biases, norm scales) that several nodes read."""
    uses = Counter(name for node in graph.node for name in set(node.input))
    return {i.name for i in graph.initializer if _float_vector(i) and uses[i.name] > 1}


def _float_vector(init) -> bool:
    return len(init.dims) <= 1 and init.data_type in FLOAT_TYPES


def value_names(graph) -> set[str]:
    """Every name a value of *graph* has: initializers, node outputs, graph inputs and outputs."""
    return {i.name for i in graph.initializer} | {name for node in graph.node for name in node.output} | \
        {v.name for v in (*graph.input, *graph.output)}


def fresh_name(name: str, taken: set[str]) -> str:
    """*name*, or *name* with a number after it, that is not in *taken* (which gets it)."""
    fresh, n = name, 0
    while fresh in taken:
        n += 1
        fresh = f"{name}.{n}"
    taken.add(fresh)
    return fresh


def own_shape_constants(model) -> int:
    """Give each Split, Reshape, Expand and Concat its own copy of an integer constant it shares with
    other nodes (PyTorch's exporter shares equal split sizes and shape pieces this way), and each
    Reshape and Expand its own copy of a Concat that builds its target shape (torch.export builds
    one for equal targets in different layers), so that pruning can rewrite one node's sizes alone;
    returns how many copies were made."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    taken = value_names(graph)
    copies = _own_shape_concats(graph, taken)
    uses = Counter(name for node in graph.node for name in node.input)
    for index, node in enumerate(graph.node):
        if node.op_type not in ("Split", "Reshape", "Expand", "Concat"):
            continue
        for k, name in enumerate(node.input):
            if name in inits and uses[name] > 1 and inits[name].data_type in (6, 7):  # INT32, INT64
                # (a node reading it twice, torch.export's [n, 2, 2, t, d], gets a copy for each)
                copy = fresh_name(f"{name}.{node.name or index}", taken)
                graph.initializer.append(_renamed_copy(inits[name], copy))
                node.input[k] = copy
                uses[name] -= 1
                copies += 1
    return copies
