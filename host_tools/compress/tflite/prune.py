"""Pruning TFLite models.

- ``tflite-prune-magnitude``: the smallest float weights become exact zeros. The file keeps its
  size and layout — each weight buffer is rewritten in place, so every other byte of the
  flatbuffer (signatures, metadata, quantization parameters) stays as the converter wrote it —
  but a bundle stores the model zstd-compressed, so the download shrinks; quantized afterwards
  (``sparse-int8``) a zero weight is one zero byte.
- ``tflite-prune-channels``: structured, as ``onnx-prune-channels``. Whole output channels of
  CONV_2D / FULLY_CONNECTED layers go, with the matching inputs of the layers reading them (see
  ``channels``), so the model is smaller and faster on any TFLite runtime; recovered by
  fine-tuning with the unpruned model as teacher.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from device_agent.errors import CompressionError, NotApplicable
from device_agent.runtime.base import first_line
from host_tools.compress import structured
from host_tools.compress.magnitude import MagnitudeConfig, thresholds
from host_tools.compress.model import ModelFile
from host_tools.compress.passes import Pass, failing_as, progress, register
from host_tools.compress.structured import ChannelPruningConfig
from host_tools.compress.tflite import flatbuffer, recurrent
from host_tools.compress.tflite.fold import constant_ops, widen_float16, widened_copy

# builtin operator name -> the inputs that hold its weights (a fused LSTM's: its gate matrices)
WEIGHT_INPUTS = {"CONV_2D": (1,), "DEPTHWISE_CONV_2D": (1,), "CONV_3D": (1,), "FULLY_CONNECTED": (1,),
                 "TRANSPOSE_CONV": (1,), "BATCH_MATMUL": (0, 1), "EMBEDDING_LOOKUP": (1,),
                 recurrent.LSTM_OP: recurrent.WEIGHTS}


@register
class TfliteMagnitudePruning(Pass):
    name = "tflite-prune-magnitude"
    formats = ("tflite",)
    summary = "unstructured magnitude pruning (zeros that a compressed bundle does not pay for)"
    requires = ("ai_edge_litert",)
    extra = "tflite"

    Config = MagnitudeConfig

    def run(self, model, config, workdir):
        out = Path(workdir) / f"{model.path.stem}.sparse{round(config.sparsity * 100)}.tflite"
        with failing_as(self.name, model):
            data = bytearray(widened_copy(model.path, Path(workdir)).read_bytes())
            weights = weight_views(data, config.min_elements)
            if not weights:
                raise NotApplicable(f"{model.path.name} has no float32 Conv/FullyConnected/BatchMatMul/LSTM weight of "
                                    f"at least {config.min_elements} elements (a model quantized already has none)")
            for view, cut in zip(weights, thresholds(weights, config)):
                view[np.abs(view) <= cut] = 0  # a view into *data*: the file's bytes change in place
            out.write_bytes(data)
        return ModelFile(out, "tflite")


def weight_views(data: bytearray, min_elements: int) -> list[np.ndarray]:
    """Writable float32 views into *data* of every weight buffer (each buffer once, however many
    tensors share it) that a weighted op reads, with at least *min_elements* elements."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(data, 0)
    codes = [flatbuffer.op_name(code.BuiltinCode(), code.DeprecatedBuiltinCode())
             for code in map(model.OperatorCodes, range(model.OperatorCodesLength()))]
    seen: set[int] = set()
    views = []
    for s in range(model.SubgraphsLength()):
        graph = model.Subgraphs(s)
        for o in range(graph.OperatorsLength()):
            op = graph.Operators(o)
            for position in WEIGHT_INPUTS.get(codes[op.OpcodeIndex()], ()):
                if position >= op.InputsLength() or op.Inputs(position) < 0:
                    continue
                tensor = graph.Tensors(op.Inputs(position))
                index = tensor.Buffer()
                count = int(np.prod(tensor.ShapeAsNumpy())) if tensor.ShapeLength() else 1
                if (tensor.Type() != schema.TensorType.FLOAT32 or tensor.ShapeLength() < 2 or count < min_elements
                        or index in seen):
                    continue
                view = _buffer_bytes(model.Buffers(index), data)
                if view is not None and view.size == 4 * count:
                    seen.add(index)
                    views.append(view.view(np.float32))
    return views


def _buffer_bytes(buffer, data: bytearray) -> np.ndarray | None:
    """The buffer's bytes as a writable uint8 view: inline in the flatbuffer, or (models over
    2 GB) at an offset past it."""
    if buffer.Offset() > 1:
        return np.frombuffer(data, np.uint8, buffer.Size(), buffer.Offset())
    if buffer.DataLength() == 0:
        return None  # a tensor computed at run time
    return buffer.DataAsNumpy()


@register
class TfliteChannelPruning(Pass):
    name = "tflite-prune-channels"
    formats = ("tflite",)
    summary = "structured pruning: really removes channels and attention heads (optional recovery by distillation)"
    requires = ("ai_edge_litert",)
    extra = "tflite"

    Config = ChannelPruningConfig

    def run(self, model, config, workdir):
        from host_tools.compress.tflite.channels import prune_channels, stale_shape_constants

        structured.check(self.name, config)
        pruned = ModelFile(Path(workdir) / f"{model.path.stem}.channels{round(config.ratio * 100)}.tflite", "tflite")
        with failing_as(self.name, model):
            tree, outside = flatbuffer.read(model.path)
            plan = prepared_plan(tree, model.path, config.exclude)
            if not plan.regions:
                raise NotApplicable(f"{model.path.name}: no layer whose channels can be removed safely "
                                    f"({plan.why_none()})")
            progress(f"      pruning {config.ratio:.0%} of the channels of {plan.summary()}")
            before = stale_shape_constants(tree)  # (a converter's own disagreements are not this pass's)
            prune_channels(tree, plan, config.ratio, config.criterion)
            flatbuffer.write(tree, outside, pruned.path)
            stale = [why for op, why in stale_shape_constants(tree).items() if op not in before]
            _check_consistent(pruned, model, stale)
        if config.recover_epochs <= 0:
            return pruned
        from host_tools.compress.torch.finetune import recover

        with failing_as(self.name, model):
            return recover(pruned, teacher=model, data=config.calibration, epochs=config.recover_epochs,
                           labels_weight=config.labels_weight, workdir=workdir)


def prepared_plan(tree, path: Path, exclude=()):
    """The channel-pruning plan of *tree* (read from *path*), after values it computes from constants
    alone are made constants and float16 weights float32 (``fold``; *tree* changes in place)."""
    from host_tools.compress.tflite.channels import plan_channel_pruning

    constant_ops(tree, path)  # (first: it reads values by the indices the file at *path* has)
    widen_float16(tree, path.name)
    return plan_channel_pruning(tree, set(exclude))


def _check_consistent(pruned: ModelFile, model: ModelFile, stale: list[str]) -> None:
    """The pruned flatbuffer must say one thing about every shape, load, run, and give outputs of the
    shapes the original gives: a pattern the plan followed wrongly fails here, as this pass's error,
    not later on a device."""
    try:
        if stale:
            raise ValueError(f"shape constants left stale: {'; '.join(stale[:3])}")
        want, got = model.outputs_on_zeros(), pruned.outputs_on_zeros()
        changed = [name for name, value in want.items() if np.shape(got.get(name)) != np.shape(value)]
        if changed:
            raise ValueError(f"output {changed[0]} is {np.shape(got.get(changed[0]))}, "
                             f"not {np.shape(want[changed[0]])}")
    except Exception as exc:  # noqa: BLE001 — the interpreter raises RuntimeError, ValueError, ModelError
        raise CompressionError(f"tflite-prune-channels made a model of {model.path.name} that is not consistent "
                               f"({first_line(exc)}); nothing written — a bug worth reporting with the model, "
                               "`--pass 'tflite-prune-channels exclude=…'` leaves the layer out") from None
