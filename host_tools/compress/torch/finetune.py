"""Recovering accuracy after structured pruning: fine-tune the pruned graph's own weights with
the unpruned model as teacher, then write them back into the same ONNX graph."""

from __future__ import annotations

from pathlib import Path

from device_agent.errors import ConfigError
from host_tools.compress.data import Dataset, load_dataset
from host_tools.compress.model import ModelFile


def recover(pruned: ModelFile, *, teacher: ModelFile, data: Dataset | str | None, epochs: int,
            labels_weight: float, workdir: Path, lr: float = 3e-3) -> ModelFile:
    import onnx

    from host_tools.compress.torch.onnx_module import OnnxModule
    from host_tools.compress.torch.trainer import Schedule, distill, teacher_targets

    if data is None:
        raise ConfigError("recovery fine-tuning needs inputs to train on (--train or --calib)")
    proto = onnx.load(str(pruned.path))
    module = OnnxModule(proto)
    runtime = teacher.load()
    bound = load_dataset(data).bind(runtime.inputs)
    targets = teacher_targets(runtime, bound)
    inputs = [bound.feeds[name] for name in module.input_names]
    distill(module, inputs, targets, bound.labels,
            Schedule(epochs=epochs, lr=lr, labels_weight=labels_weight if bound.labels is not None else 0.0),
            what="recovering the pruned model")
    module.write_back(proto)
    out = Path(workdir) / f"{pruned.path.stem}.recovered.onnx"
    onnx.save(proto, str(out))
    return ModelFile(out, "onnx")
