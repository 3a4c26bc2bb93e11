"""Reading and writing a TFLite flatbuffer as an object tree (``ai_edge_litert.tools``), keeping
the layout litert-quantizer gives larger models: weight buffers stored past the flatbuffer,
16-byte aligned.

Writing stores equal shapes, quantization parameters and operator options once (weights keep a
copy each, see _pack), and no quantization table where a tensor has no parameters. A flatbuffer
may point at one vector or table from many places, and TFLite only reads them; the object tree's
own packer writes a copy for every holder.
After full int8 most tensors carry quantization parameters that their neighbours have too (a
Reshape's output has its input's scale), and most shapes repeat: on the CRNN fixture, whose LSTM
is unrolled into ~900 tensors, sharing them takes the int8 file from 0.91x to 0.66x of the float
one, with the same bytes in every tensor.
"""

from __future__ import annotations

import functools
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np

_FILE_IDENTIFIER = b"TFL3"


def read(path: Path):
    """(the model as an object tree, the data of the buffers stored past its flatbuffer)."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    data = path.read_bytes()
    packed = schema.Model.GetRootAs(data, 0)
    buffers = (packed.Buffers(i) for i in range(packed.BuffersLength()))
    outside = [bytes(data[b.Offset():b.Offset() + b.Size()]) for b in buffers if b.Offset() > 1]
    return flatbuffer_utils.read_model_from_bytearray(bytearray(data)), outside  # the tree has them inside


def write(tree, outside: list[bytes], path: Path) -> None:
    """*tree* to *path*; buffers whose data is one of *outside* are stored past the flatbuffer again,
    each at a 16-byte boundary, as they came."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    wanted = set(outside)
    moved = {}
    for index, buffer in enumerate(tree.buffers):
        if buffer.data is not None and bytes(buffer.data) in wanted:
            moved[index] = bytes(buffer.data)
            buffer.data, buffer.offset, buffer.size = None, 1, 1  # room for the real values, set below
    blob = _pack(tree)
    packed = schema.Model.GetRootAs(blob, 0)
    for index, payload in moved.items():
        blob.extend(bytes(-len(blob) % 16))
        flatbuffer_utils.update_packed_buffer(packed.Buffers(index), offset=len(blob), size=len(payload))
        blob.extend(payload)
    path.write_bytes(bytes(blob))


def _pack(tree) -> bytearray:
    """*tree* as flatbuffer bytes, each distinct vector (shapes, scales, zero points, operator inputs)
    and each distinct quantization or builtin options table written once. Byte vectors (buffers' data,
    custom options) keep a copy each: tflite-prune-magnitude edits a weight buffer's bytes in place,
    and must not change another tensor that happens to hold the same bytes."""
    import flatbuffers

    class SharingBuilder(flatbuffers.Builder):
        def __init__(self) -> None:
            super().__init__(1024)
            self.vectors: dict[tuple[str, bytes], int] = {}

        def CreateNumpyVector(self, x):  # noqa: N802  (flatbuffers' name)
            if x.dtype == np.uint8:
                return super().CreateNumpyVector(x)
            key = (x.dtype.str, x.tobytes())
            if key not in self.vectors:
                self.vectors[key] = super().CreateNumpyVector(x)
            return self.vectors[key]

    # Each holder of a quantization table or a builtin options table, with what it holds now;
    # while packing it holds a stand-in that writes equal tables once (no table for empty quantization).
    holders = [(t, "quantization", t.quantization) for graph in tree.subgraphs for t in graph.tensors
               if t.quantization is not None]
    holders += [(op, "builtinOptions", op.builtinOptions) for graph in tree.subgraphs for op in graph.operators
                if op.builtinOptions is not None]
    shared: dict[tuple, _PackedOnce] = {}
    for holder, field, table in holders:
        if field == "quantization" and _empty(table):
            setattr(holder, field, None)  # TFLite reads an empty table and no table alike: not quantized
        else:
            setattr(holder, field, shared.setdefault(_key(table), _PackedOnce(table)))
    builder = SharingBuilder()
    try:
        builder.Finish(tree.Pack(builder), file_identifier=_FILE_IDENTIFIER)
    finally:
        for holder, field, table in holders:
            setattr(holder, field, table)
    return bytearray(builder.Output())


class _PackedOnce:
    """Stands for a tensor's quantization parameters while the tree is packed: the table is written
    the first time, and every tensor with equal parameters points at it."""

    def __init__(self, table) -> None:
        self.table, self.offset = table, None

    def Pack(self, builder) -> int:  # noqa: N802
        if self.offset is None:
            self.offset = self.table.Pack(builder)
        return self.offset


def _empty(q) -> bool:
    return all(v is None for v in (q.min, q.max, q.scale, q.zeroPoint, q.details))


def _key(table) -> tuple:
    """Equal for tables that pack to the same bytes: their class and fields, where every field is a
    number, a string, None or a vector of numbers. A table holding another table (custom
    quantization details, a quantization spec) is never shared."""
    fields = []
    for name, value in sorted(vars(table).items()):
        if isinstance(value, (list, np.ndarray)):
            array = np.asarray(value)
            if array.dtype == object:
                return (id(table),)
            value = (array.dtype.str, array.tobytes())
        elif value is not None and not isinstance(value, (bool, int, float, str, bytes, np.generic)):
            return (id(table),)
        fields.append((name, value))
    return (type(table).__name__, *fields)


def op_name(builtin_code: int, deprecated_code: int) -> str:
    """An operator code's builtin name ("CONV_2D"); codes past 127 live in the builtin code only,
    older files give the deprecated one. "CUSTOM" for custom operators and codes this schema lacks."""
    return _op_names().get(max(builtin_code, deprecated_code), "CUSTOM")


@functools.cache
def _op_names() -> dict[int, str]:
    from ai_edge_litert import schema_py_generated as schema

    return {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}


def opcode(tree, builtin: int, version: int) -> int:
    """The index of operator *builtin* in *tree*'s operator codes (its version raised to *version*),
    added if missing."""
    from ai_edge_litert import schema_py_generated as schema

    for i, code in enumerate(tree.operatorCodes):
        if max(code.builtinCode, code.deprecatedBuiltinCode) == builtin:
            code.version = max(code.version, version)
            return i
    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = builtin
    code.version = version
    tree.operatorCodes.append(code)
    return len(tree.operatorCodes) - 1


def buffer_holders(tree) -> Counter:
    """How many tensors, in every subgraph, hold each buffer: a constant whose buffer only one tensor
    holds can be rewritten without changing another tensor's value."""
    return Counter(tensor.buffer for graph in tree.subgraphs for tensor in graph.tensors)


def op_kinds(data: bytes) -> set[str]:
    """The builtin names of the operators a model uses ("CONV_2D", ...), from its operator codes in
    the packed flatbuffer, without building the object tree."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(data, 0)
    codes = (model.OperatorCodes(i) for i in range(model.OperatorCodesLength()))
    return {op_name(c.BuiltinCode(), c.DeprecatedBuiltinCode()) for c in codes}


def operators(data: bytes) -> list[list[tuple[str, tuple[int, ...], tuple[int, ...], tuple[bytes, ...]]]]:
    """Each subgraph's operators in order, as (builtin name, input tensor indices, output tensor
    indices, output tensor names), read from the packed flatbuffer without building the object
    tree. An optional input left out is index -1."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(data, 0)
    kinds = [op_name(c.BuiltinCode(), c.DeprecatedBuiltinCode())
             for c in (model.OperatorCodes(i) for i in range(model.OperatorCodesLength()))]
    graphs = []
    for g in range(model.SubgraphsLength()):
        graph = model.Subgraphs(g)
        ops = []
        for k in range(graph.OperatorsLength()):
            op = graph.Operators(k)
            inputs = tuple(op.Inputs(i) for i in range(op.InputsLength()))
            outputs = tuple(op.Outputs(i) for i in range(op.OutputsLength()))
            ops.append((kinds[op.OpcodeIndex()], inputs, outputs,
                        tuple(graph.Tensors(t).Name() or b"" for t in outputs if t >= 0)))
        graphs.append(ops)
    return graphs


def lacks_unique_names(data: bytes) -> bool:
    """Whether a tensor of the model (in any subgraph) has no name, or the name of another, which
    litert-quantizer refuses ("Tensor name ... is not unique", or an AttributeError on the missing
    name: tflite-compact's output has none); read from the packed flatbuffer."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(data, 0)
    seen = set()
    for g in range(model.SubgraphsLength()):
        graph = model.Subgraphs(g)
        for t in range(graph.TensorsLength()):
            name = graph.Tensors(t).Name()
            if not name or name in seen:
                return True
            seen.add(name)
    return False


def unique_names(tree) -> int:
    """Name the tensors of *tree* that have no name ("tensor"), and rename those whose name another
    tensor has already (suffixed ";2", ";3" ...); subgraph inputs and outputs keep theirs. Returns
    how many were named or renamed."""
    graphs = tree.subgraphs or []
    io = {(g, t) for g, graph in enumerate(graphs) for t in [*(graph.inputs or []), *(graph.outputs or [])]}
    taken = {graphs[g].tensors[t].name or b"" for g, t in io}
    renamed = 0
    for g, graph in enumerate(graphs):
        for t, tensor in enumerate(graph.tensors or []):
            if (g, t) in io:
                continue
            name = tensor.name or b"tensor"
            if name in taken:
                n = 2
                while name + b";%d" % n in taken:
                    n += 1
                name = name + b";%d" % n
            if name != tensor.name:
                tensor.name, renamed = name, renamed + 1
            taken.add(name)
    return renamed


def io_names(data: bytes) -> dict[tuple[int, str, int], bytes]:
    """(subgraph, "in"/"out", position) -> tensor name, for every subgraph's inputs and outputs:
    what an interpreter's input and output details list. Read from the packed flatbuffer, without
    building the object tree. (Not the signatures: litert-quantizer can leave one naming the float
    tensor before the Quantize it put in front of an output.)"""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(data, 0)
    names = {}
    for g in range(model.SubgraphsLength()):
        graph = model.Subgraphs(g)
        for side, count, index in (("in", graph.InputsLength(), graph.Inputs),
                                   ("out", graph.OutputsLength(), graph.Outputs)):
            names.update(((g, side, p), graph.Tensors(index(p)).Name()) for p in range(count))
    return names


def restore_io_names(original: Path, changed: Path) -> None:
    """Give *changed*'s inputs and outputs the tensor names they have in *original* (the file is
    rewritten only when one differs).

    litert-quantizer's full int8 puts a Quantize before an output it makes int8 and names the new
    output tensor after the old one plus "_quantized"; callers (and the evaluation against the
    original) read outputs by name. The float tensor the Quantize reads keeps its name, so it
    becomes "<name>_float" if it would clash."""
    have = io_names(changed.read_bytes())
    wrong = {key: name for key, name in io_names(original.read_bytes()).items() if have.get(key) not in (None, name)}
    if not wrong:
        return
    tree, outside = read(changed)
    for (g, side, position), want in wrong.items():
        graph = tree.subgraphs[g]
        for other in graph.tensors:
            if other.name == want:
                other.name = want + b"_float"
        graph.tensors[(graph.inputs if side == "in" else graph.outputs)[position]].name = want
    write(tree, outside, changed)


def keep_appended(original: Path, changed: Path) -> None:
    """Append to *changed* the files of the zip appended to *original*, where it has one and
    *changed* none: the metadata an Ultralytics export carries (metadata.json: task, class names,
    image size), which Ultralytics' predict reads from the model file, or TFLite Support's
    associated files (labels). Passes write a new flatbuffer, and lost it."""
    try:
        with zipfile.ZipFile(original) as appended:
            files = [(info, appended.read(info)) for info in appended.infolist()]
    except (zipfile.BadZipFile, OSError):
        return
    if not files or zipfile.is_zipfile(changed):
        return
    with zipfile.ZipFile(changed, "a") as appending:
        for info, data in files:
            appending.writestr(info, data)
