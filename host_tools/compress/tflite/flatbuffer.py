"""Reading and writing a TFLite flatbuffer as an object tree (``ai_edge_litert.tools``), keeping
the layout litert-quantizer gives larger models: weight buffers stored past the flatbuffer,
16-byte aligned."""

from __future__ import annotations

from pathlib import Path


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
    blob = bytearray(flatbuffer_utils.convert_object_to_bytearray(tree))
    packed = schema.Model.GetRootAs(blob, 0)
    for index, payload in moved.items():
        blob.extend(bytes(-len(blob) % 16))
        flatbuffer_utils.update_packed_buffer(packed.Buffers(index), offset=len(blob), size=len(payload))
        blob.extend(payload)
    path.write_bytes(bytes(blob))


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
