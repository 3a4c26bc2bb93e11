"""Values a TFLite graph computes from constants alone, made constants: the TFLite counterpart of
``onnx/static_shapes.constant_subgraphs``.

litert-torch leaves some computations on constants in the graph, run at every inference: YOLOS
resizes its position table to the grid of patches (BROADCAST_TO, GATHER_ND of the table with
constant indices, TRANSPOSE, RESHAPE, CONCATENATION). Structured pruning sees their result as a
branch no layer explains; as a constant it is a per-channel constant it can cut. The values are read
from the TFLite interpreter itself (every tensor kept), so they are exactly what the model computed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from host_tools.compress.passes import progress
from host_tools.compress.tflite import flatbuffer
from host_tools.compress.tflite.graph import Graph

# Never replaced by their values: state, control flow and random draws are not functions of the
# op's constant inputs.
NOT_CONSTANT = {"VAR_HANDLE", "READ_VARIABLE", "ASSIGN_VARIABLE", "CALL_ONCE", "WHILE", "IF", "CALL",
                "RANDOM_STANDARD_NORMAL", "RANDOM_UNIFORM", "MULTINOMIAL", "DEQUANTIZE", "QUANTIZE"}


def constant_ops(tree, path: Path, slack_bytes: int = 4096) -> int:
    """Replace the tensors of *tree* (read from *path*) that ops compute from constants alone with
    their values, and drop the ops no longer needed. A value is taken when it is at most
    *slack_bytes* larger than the constants it is computed from, so the file does not grow (an
    attention mask built from a few numbers, or a broadcast, stays a computation). Returns how many
    tensors became constants."""
    from ai_edge_litert import schema_py_generated as schema

    g = Graph(tree)
    computed: set[int] = set()
    for k, op in enumerate(g.ops):
        given = [int(t) for t in op.inputs if t >= 0]
        if given and g.kinds[k] not in NOT_CONSTANT and all(t in computed or g.stored(t) for t in given):
            computed.update(int(t) for t in op.outputs)
    live = [k for k, op in enumerate(g.ops) if not {int(t) for t in op.outputs} <= computed]
    frontier = sorted({int(t) for k in live for t in g.ops[k].inputs if int(t) in computed} - g.outputs)
    if not frontier:
        return 0
    made_by = {int(t): k for k, op in enumerate(g.ops) for t in op.outputs}

    def from_bytes(t: int) -> int:  # of the constants *t* is computed from
        seen, stack = set(), [t]
        while stack:
            for given in (int(i) for i in g.ops[made_by[stack.pop()]].inputs if i >= 0):
                if given in made_by and given not in seen:
                    stack.append(given)
                seen.add(given)
        return sum(len(tree.buffers[g.tensor(given).buffer].data) for given in seen if given not in made_by)

    values = {t: value for t, value in _values(path, frontier).items()
              if value.nbytes <= from_bytes(t) + slack_bytes}
    if not values:
        return 0
    needed = set(g.outputs) | {int(t) for k in live for t in g.ops[k].inputs}
    dead = set()
    for k in reversed(range(len(g.ops))):
        outputs = {int(t) for t in g.ops[k].outputs}
        if outputs <= computed and not (outputs & needed - set(values)):
            dead.add(k)
        else:
            needed.update(int(t) for t in g.ops[k].inputs)
    for t, value in values.items():
        buffer = schema.BufferT()
        buffer.data = np.frombuffer(np.ascontiguousarray(value).tobytes(), np.uint8).copy()
        tree.buffers.append(buffer)
        g.tensor(t).buffer = len(tree.buffers) - 1
    g.graph.operators = [op for k, op in enumerate(g.ops) if k not in dead]
    _drop_unused_tensors(tree)
    return len(values)


def widened_copy(path: Path, workdir: Path) -> Path:
    """*path* itself when no DEQUANTIZE there reads a float16 constant; else a copy in *workdir* whose
    float16 weights are float32 (``widen_float16``)."""
    if "DEQUANTIZE" not in flatbuffer.op_kinds(path.read_bytes()):
        return path
    tree, outside = flatbuffer.read(path)
    if not widen_float16(tree, path.name):
        return path
    out = Path(workdir) / f"{path.stem}.float32.tflite"
    flatbuffer.write(tree, outside, out)
    return out


def widen_float16(tree, name: str) -> int:
    """``float16_constants`` on *tree* (of the model file *name*), said in a progress line when it
    widened any."""
    widened = float16_constants(tree)
    if widened:
        progress(f"      {name} stores weights as float16: {widened} widened to float32 first, every value "
                 "exactly as it was")
    return widened


def float16_constants(tree) -> int:
    """Where a DEQUANTIZE turns a float16 constant into the float32 its readers take (TensorFlow's
    and litert's float16 quantization), make the float32 values the constant and drop the
    DEQUANTIZE, in every subgraph (a Keras LSTM's loop body holds its weights): the TFLite
    counterpart of ``onnx/widen``, so that a float16 file can be quantized to int8
    (litert-quantizer reads float32 weights only). Every value stays exactly what the readers took.
    Returns how many constants were widened."""
    from ai_edge_litert import schema_py_generated as schema

    count = 0
    for index in range(len(tree.subgraphs)):
        g = Graph(tree, index)
        widened = set()
        for k, kind in enumerate(g.kinds):
            source = g.input(k, 0)
            if kind != "DEQUANTIZE" or not g.stored(source) or g.tensor(source).type != schema.TensorType.FLOAT16:
                continue
            buffer = schema.BufferT()
            buffer.data = np.frombuffer(g.const(source).astype(np.float32).tobytes(), np.uint8).copy()
            tree.buffers.append(buffer)
            g.tensor(int(g.ops[k].outputs[0])).buffer = len(tree.buffers) - 1
            widened.add(k)
        if widened:
            g.graph.operators = [op for k, op in enumerate(g.ops) if k not in widened]
            _drop_unused_tensors(tree, index)
            count += len(widened)
    return count


def _drop_unused_tensors(tree, index: int = 0) -> None:
    """Take out of subgraph *index* (the main graph unless told) the tensors nothing refers to any
    more (the dropped ops' results and the constants only they read), and empty the buffers only
    they held (which would otherwise stay in the file beside the values that replaced them). Left
    in, with no data and no op making them, they are tensors whose value an interpreter that keeps
    every tensor cannot give, which stops litert-quantizer's calibration ("Tensor data is null")."""
    graph = tree.subgraphs[index]
    used = {int(t) for op in graph.operators for t in (*op.inputs, *op.outputs, *(op.intermediates or ())) if t >= 0}
    used |= {int(t) for t in (*graph.inputs, *graph.outputs)}
    signatures = [s for s in tree.signatureDefs or () if s.subgraphIndex == index]
    used |= {int(e.tensorIndex) for s in signatures for e in (*(s.inputs or ()), *(s.outputs or ()))}
    if len(used) == len(graph.tensors):
        return
    keep = sorted(used)
    live = {graph.tensors[t].buffer for t in keep}
    live |= {tensor.buffer for i, other in enumerate(tree.subgraphs) if i != index for tensor in other.tensors}
    live |= {entry.buffer for entry in tree.metadata or ()}
    for t, tensor in enumerate(graph.tensors):
        if t not in used and tensor.buffer not in live and tensor.buffer > 0:
            tree.buffers[tensor.buffer].data = None
    new = {old: i for i, old in enumerate(keep)}

    def moved(indices):
        return None if indices is None else [new[int(t)] if t >= 0 else int(t) for t in indices]

    graph.tensors = [graph.tensors[t] for t in keep]
    for op in graph.operators:
        op.inputs, op.outputs, op.intermediates = moved(op.inputs), moved(op.outputs), moved(op.intermediates)
    graph.inputs, graph.outputs = moved(graph.inputs), moved(graph.outputs)
    for entry in (e for s in signatures for e in (*(s.inputs or ()), *(s.outputs or ()))):
        entry.tensorIndex = new[int(entry.tensorIndex)]


def _values(path: Path, tensors: list[int]) -> dict[int, np.ndarray]:
    """The values of *tensors* when the model at *path* runs once on zeros, from an interpreter that
    keeps every tensor (without delegates, which would keep their own); empty when it does not run."""
    try:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        interpreter = Interpreter(model_path=str(path), experimental_preserve_all_tensors=True,
                                  experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        interpreter.allocate_tensors()
        for detail in interpreter.get_input_details():
            interpreter.set_tensor(detail["index"], np.zeros(detail["shape"], detail["dtype"]))
        interpreter.invoke()
        return {t: np.array(interpreter.get_tensor(t)) for t in tensors}
    except Exception:  # noqa: BLE001 — any failure means: not known
        return {}
