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


def io_tensors(tree) -> dict[tuple[int, str, int], int]:
    """(subgraph, "in"/"out", position) -> tensor index, for every subgraph's inputs and outputs:
    what an interpreter's input and output details list. (Not the signatures: litert-quantizer
    can leave one naming the float tensor before the Quantize it put in front of an output.)"""
    return {(g, side, position): index for g, graph in enumerate(tree.subgraphs)
            for side, indices in (("in", graph.inputs), ("out", graph.outputs))
            for position, index in enumerate(indices)}


def restore_io_names(original: Path, changed: Path) -> None:
    """Give *changed*'s inputs and outputs the tensor names they have in *original*.

    litert-quantizer's full int8 puts a Quantize before an output it makes int8 and names the new
    output tensor after the old one plus "_quantized"; callers (and the evaluation against the
    original) read outputs by name. The float tensor the Quantize reads keeps its name, so it
    becomes "<name>_float" if it would clash."""
    before, _ = read(original)
    after, outside = read(changed)
    names = {key: before.subgraphs[key[0]].tensors[t].name for key, t in io_tensors(before).items()}
    renamed = False
    for key, t in io_tensors(after).items():
        want, tensors = names.get(key), after.subgraphs[key[0]].tensors
        if want is None or tensors[t].name == want:
            continue
        for other in tensors:
            if other.name == want:
                other.name = want + b"_float"
        tensors[t].name, renamed = want, True
    if renamed:
        write(after, outside, changed)
