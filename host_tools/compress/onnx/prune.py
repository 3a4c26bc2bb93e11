"""Pruning ONNX models.

- ``onnx-prune-magnitude``: unstructured sparsity. The smallest weights become exact zeros; the
  file keeps its size, but a bundle stores it zstd-compressed, so the download shrinks (more so
  after int8, where a zero weight is one zero byte).
- ``onnx-prune-channels``: structured. Whole output channels of Conv/Gemm/MatMul layers are
  removed, with the matching input channels of the layers that read them, so the model is
  smaller and faster on any runtime; layers tied by a residual Add or a gate lose the same
  channels, and attention layers lose whole heads (see ``heads``). Only patterns it can prune
  safely are touched (see ``channels``): channels that reach an op it cannot follow or a graph
  output stay, and the report says why.
"""

from __future__ import annotations

import numpy as np

from device_agent.errors import CompressionError, NotApplicable
from device_agent.runtime.base import first_line
from host_tools.compress import structured
from host_tools.compress.magnitude import MagnitudeConfig, thresholds
from host_tools.compress.model import ModelFile
from host_tools.compress.onnx import static_shapes
from host_tools.compress.onnx.boundary import output_path, quantized_already, sort_topologically
from host_tools.compress.onnx.initializers import (drop_initializer_inputs, hoist_constants,
                                                   inline_constant_identities, own_shape_constants,
                                                   own_small_constants, share_equal_initializers, whole_shapes)
from host_tools.compress.onnx.channels import plan_channel_pruning, prune_channels
from host_tools.compress.onnx.widen import widen_float16
from host_tools.compress.passes import Pass, failing_as, progress, register
from host_tools.compress.structured import ChannelPruningConfig

PRUNABLE_OPS = ("Conv", "Gemm", "MatMul")
# op type -> the inputs holding its weights, for magnitude pruning: a recurrent layer's input and
# recurrent matrices (W, R) hold most of a speech model's weights
SPARSE_WEIGHTS = {**{op: (1,) for op in PRUNABLE_OPS}, "LSTM": (1, 2), "GRU": (1, 2), "RNN": (1, 2)}


@register
class OnnxMagnitudePruning(Pass):
    name = "onnx-prune-magnitude"
    formats = ("onnx",)
    summary = "unstructured magnitude pruning (zeros that a compressed bundle does not pay for)"
    requires = ("onnx",)

    Config = MagnitudeConfig

    def run(self, model, config, workdir):
        import onnx
        from onnx import numpy_helper

        out = output_path(workdir, model, f"sparse{round(config.sparsity * 100)}")
        with failing_as(self.name, model):
            proto = onnx.load(str(model.path))
            weights = _weight_initializers(proto, config.min_elements)
            if not weights:
                raise NotApplicable(f"{model.path.name} has no Conv/Gemm/MatMul/LSTM/GRU/RNN weight of at least "
                                    f"{config.min_elements} elements{quantized_already(proto.graph)}")
            arrays = [numpy_helper.to_array(init) for init in weights]
            for init, array, cut in zip(weights, arrays, thresholds(arrays, config)):
                init.CopyFrom(numpy_helper.from_array(np.where(np.abs(array) <= cut, 0, array).astype(array.dtype),
                                                      init.name))
            onnx.save(proto, str(out))
        return ModelFile(out, "onnx")


def _weight_initializers(proto, min_elements: int) -> list:
    by_name = {i.name: i for i in proto.graph.initializer}
    found = {}
    for node in proto.graph.node:
        for position in SPARSE_WEIGHTS.get(node.op_type, ()):
            init = by_name.get(node.input[position]) if position < len(node.input) else None
            if init is not None and len(init.dims) >= 2 and int(np.prod(init.dims)) >= min_elements \
                    and init.data_type in (1, 10):  # float32, float16 (zeros where they were)
                found[init.name] = init
    return list(found.values())


@register
class OnnxChannelPruning(Pass):
    name = "onnx-prune-channels"
    formats = ("onnx",)
    summary = "structured pruning: really removes channels and attention heads (optional recovery by distillation)"
    requires = ("onnx",)

    Config = ChannelPruningConfig

    def run(self, model, config, workdir):
        import onnx

        structured.check(self.name, config)
        pruned_path = output_path(workdir, model, f"channels{round(config.ratio * 100)}")
        with failing_as(self.name, model):
            proto = onnx.load(str(model.path))
            if config.recover_epochs > 0 and widen_float16(proto):  # (recovery trains float32 weights)
                progress(f"      {model.path.name} computes in float16: widened to float32 to recover it, exactly; "
                         "the result is float32 (onnx-fp16 after this pass makes it float16 again)")
            plan = prepared_plan(proto, config.exclude)
            if not plan.groups:
                raise NotApplicable(f"{model.path.name}: no layer whose channels can be removed safely "
                                    f"({plan.why_none()}){quantized_already(proto.graph)}")
            progress(f"      pruning {config.ratio:.0%} of the channels of {plan.summary()}")
            prune_channels(proto, plan, config.ratio, config.criterion)
            _check_consistent(proto, model)
            if config.recover_epochs <= 0:
                share_equal_initializers(proto.graph)  # copies no pruning changed: shared again
            onnx.save(proto, str(pruned_path))
        pruned = ModelFile(pruned_path, "onnx")
        if config.recover_epochs <= 0:
            return pruned
        from host_tools.compress.torch.finetune import recover

        with failing_as(self.name, model):
            # Recovery trains each copy on its own; what is still equal afterwards is shared again.
            recovered = recover(pruned, teacher=model, data=config.calibration, epochs=config.recover_epochs,
                                labels_weight=config.labels_weight, workdir=workdir)
            proto = onnx.load(str(recovered.path))
            if share_equal_initializers(proto.graph):
                onnx.save(proto, str(recovered.path))
        return recovered


def _check_consistent(proto, model: ModelFile) -> None:
    """Every shape in the pruned graph must still agree (strict shape inference): a pattern the plan
    followed wrongly fails here, as this pass's error, not later as a model that will not load."""
    import onnx

    try:
        onnx.shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True)
    except Exception as exc:  # noqa: BLE001 — onnx raises InferenceError and others
        raise CompressionError(f"onnx-prune-channels made an inconsistent graph of {model.path.name} "
                               f"({first_line(exc)}); nothing written — a bug worth reporting with the model, "
                               "`--pass 'onnx-prune-channels exclude=…'` leaves the layer out") from None


def prepared_plan(proto, exclude=()):
    """The channel-pruning plan of *proto*, after the preparation that lets the planner follow more
    (*proto* changes in place; it computes what it did)."""
    drop_initializer_inputs(proto)  # (IR < 4 lists weights as inputs too, which would keep their old shapes)
    sort_topologically(proto.graph)  # the walk follows the nodes in order (ONNX Runtime loads any order)
    hoist_constants(proto)  # exporters write biases and activation constants as Constant nodes
    inline_constant_identities(proto)  # or share one through Identity nodes
    whole_shapes(proto)  # torch.export reads a whole shape as Shape(x, start=0)
    static_shapes.fold(proto)  # torch.chunk's bounds, computed from the channel count, made constant
    static_shapes.constant_subgraphs(proto)  # and values computed from constants only, made constants
    static_shapes.slices_as_split(proto)  # and its Slices one Split, whose sizes can be rewritten
    static_shapes.split_sizes_written(proto)  # as can a Split's into num_outputs parts, once written out
    static_shapes.packed_sections_as_split(proto)  # nn.MultiheadAttention's packed Q/K/V (torch.export)
    static_shapes.folded_heads_unfolded(proto)  # and its heads folded into the batch, on an axis of their own
    own_shape_constants(proto)  # exporters share equal split sizes and shapes directly
    plan = plan_channel_pruning(proto, set(exclude))
    while own_small_constants(proto, plan.shared):  # and equal biases and norm scales (torch.export)
        plan = plan_channel_pruning(proto, set(exclude))  # (groups that grow may meet more of them)
    return plan
