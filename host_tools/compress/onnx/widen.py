"""A float16 ONNX model widened to float32, exactly, so that int8 can be made from it.

Models often arrive in float16 only: exported for a Jetson's GPU, or published so (a model hub's
``model_fp16.onnx``). ONNX Runtime's quantizers read float32 weights and skip float16 ones, so
``onnx-preprocess`` widens such a graph first: every float16 weight and constant becomes float32
(each value exactly as it was), every Cast or dtype to float16 one to float32, and float16 inputs
and outputs keep their type behind a Cast, so callers feed and read what they did. The widened
graph computes in float32, never less exactly than the float16 one, and the accuracy guard
measures every pass against the float16 original, as against any original.
"""

from __future__ import annotations

from host_tools.compress.onnx.boundary import subgraph_reads
from host_tools.compress.onnx.initializers import fresh_name, value_names

FLOAT, FLOAT16 = 1, 10  # TensorProto data types
_GRAPH, _TENSOR, _GRAPHS, _TENSORS = 5, 4, 10, 9  # AttributeProto types


def widen_float16(model) -> int:
    """Rewrite *model* (a ModelProto) in place so that it computes in float32 where it computed in
    float16; returns how many float16 tensors (weights, constants, Casts, typed values) changed,
    0 for a model with none (one widened already)."""
    graph = model.graph
    outputs = {v.name for v in graph.output if _elem_type(v.type) == FLOAT16}
    outputs -= {name for node in graph.node for name in node.input} | subgraph_reads(graph)
    # a Cast to float16 that makes an output nothing else reads is where the graph meets its caller: it stays
    made = {n.output[0] for n in graph.node if n.op_type == "Cast" and n.output[0] in outputs
            and any(a.name == "to" and a.i == FLOAT16 for a in n.attribute)}
    changed = _widen_graph(graph, made)
    if not changed:  # (float16 inputs and outputs alone: read and made by Casts, as widening leaves them)
        return 0
    weights = {init.name for init in graph.initializer}
    for value in graph.input:  # (old exporters list weights as inputs too: float32 now, as the weights are)
        if value.name in weights:
            _widen_type(value.type)
    inputs = [v.name for v in graph.input if _elem_type(v.type) == FLOAT16]
    taken = value_names(graph)
    for name in inputs:  # the caller still feeds float16; the graph reads it as float32
        wide = fresh_name(f"{name}_float32", taken)
        _rename_reads(graph, name, wide)
        graph.node.insert(0, _cast(name, wide, FLOAT))
    for value in graph.output:
        if _elem_type(value.type) != FLOAT16 or value.name in inputs or value.name in made:
            continue
        name, wide = value.name, fresh_name(f"{value.name}_float32", taken)
        _rename_everywhere(graph, name, wide)  # the caller still reads float16: made at the end from the float32
        graph.node.append(_cast(wide, name, FLOAT16))
    return changed


def _widen_graph(graph, made: set[str] = frozenset()) -> int:
    """Widen *graph*'s own float16 (its subgraphs' too), not its inputs and outputs nor the Casts
    that make the outputs named in *made*; returns how many things changed."""
    from onnx import numpy_helper

    changed = 0
    for k, init in enumerate(graph.initializer):
        if init.data_type == FLOAT16:
            graph.initializer[k].CopyFrom(_widened_tensor(init, numpy_helper))
            changed += 1
    for value in graph.value_info:
        changed += _widen_type(value.type)
    for node in graph.node:
        for a in node.attribute:
            if a.type == _TENSOR and a.t.data_type == FLOAT16:
                a.t.CopyFrom(_widened_tensor(a.t, numpy_helper))
                changed += 1
            elif a.type == _TENSORS:
                for t in a.tensors:
                    if t.data_type == FLOAT16:
                        t.CopyFrom(_widened_tensor(t, numpy_helper))
                        changed += 1
            elif a.name in ("to", "dtype") and a.i == FLOAT16 and node.output[0] not in made:
                # Cast; RandomNormal, EyeLike and the like
                a.i = FLOAT
                changed += 1
            for sub in ([a.g] if a.type == _GRAPH else list(a.graphs) if a.type == _GRAPHS else []):
                changed += _widen_graph(sub)
                for value in (*sub.input, *sub.output):  # a loop body's carried values: inside, not the caller's
                    changed += _widen_type(value.type)
    return changed


def _widened_tensor(tensor, numpy_helper):
    wide = numpy_helper.from_array(numpy_helper.to_array(tensor).astype("float32"), tensor.name)
    wide.doc_string = tensor.doc_string
    return wide


def _elem_type(type_proto) -> int:
    return type_proto.tensor_type.elem_type if type_proto.HasField("tensor_type") else 0


def _widen_type(type_proto) -> int:
    """A float16 tensor type (also inside a sequence or an optional) made float32; 1 when it was."""
    kind = type_proto.WhichOneof("value")
    if kind == "tensor_type" and type_proto.tensor_type.elem_type == FLOAT16:
        type_proto.tensor_type.elem_type = FLOAT
        return 1
    if kind in ("sequence_type", "optional_type"):
        return _widen_type(getattr(type_proto, kind).elem_type)
    return 0


def _cast(source: str, target: str, to: int):
    from onnx import helper

    return helper.make_node("Cast", [source], [target], name=f"{target}_cast", to=to)


def _rename_reads(graph, old: str, new: str) -> None:
    """Every read of *old* in *graph* and its subgraphs (which may read outer names) reads *new*."""
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        for a in node.attribute:
            for sub in ([a.g] if a.type == _GRAPH else list(a.graphs) if a.type == _GRAPHS else []):
                if old not in {v.name for v in sub.input}:  # (a body's own input of that name hides it)
                    _rename_reads(sub, old, new)


def _rename_everywhere(graph, old: str, new: str) -> None:
    """*old* renamed *new* where *graph*'s nodes make it, read it, or hold it as an initializer."""
    _rename_reads(graph, old, new)
    for node in graph.node:
        node.output[:] = [new if name == old else name for name in node.output]
    for init in graph.initializer:
        if init.name == old:
            init.name = new
