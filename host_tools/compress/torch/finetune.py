"""Recovering accuracy after structured pruning: fine-tune the pruned graph's own weights with
the unpruned model as teacher, then write them back into the same ONNX graph or TFLite flatbuffer."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from device_agent.errors import CompressionError, ConfigError
from host_tools.compress import yolo
from host_tools.compress.data import BoundData, Dataset, load_dataset
from host_tools.compress.evaluate import bind, outputs_on
from host_tools.compress.model import ModelFile


def recover(pruned: ModelFile, *, teacher: ModelFile, data: Dataset | str | None, epochs: int,
            labels_weight: float, workdir: Path, lr: float = 3e-3) -> ModelFile:
    """*pruned* fine-tuned to give *teacher*'s outputs on *data*."""
    from host_tools.compress.torch.trainer import SamplesFirst, Schedule, distill, teacher_targets

    if data is None:
        raise ConfigError("recovery fine-tuning needs inputs to train on (--train or --calib)")
    heads = _detector_heads(pruned, teacher, workdir)
    if heads:  # (a TFLite detector: trained up to its post-processing, which stays as it is)
        from host_tools.compress.tflite.detection import with_weights_of

        trained = recover(heads[0], teacher=heads[1], data=data, epochs=epochs, labels_weight=labels_weight,
                          workdir=workdir, lr=lr)
        return with_weights_of(pruned, trained, Path(workdir) / f"{pruned.path.stem}.recovered{pruned.path.suffix}")
    graph, module, save = _trainable(pruned)
    runtime = teacher.load()
    bound = bind(load_dataset(data), runtime)
    targets = teacher_targets(runtime, bound)
    if bound.fixed_batch:  # (also a graph that declares a batch axis, but runs one sample per call)
        module.per_sample = True
    trained = SamplesFirst(module, module.input_names, module.output_names, bound.axes)
    inputs = [bound.feeds[name] for name in module.input_names]
    _check_same_as_runtime(trained, pruned, bound)
    distill(trained, inputs, [targets[name] for name in module.output_names], bound.labels,
            Schedule(epochs=epochs, lr=lr, labels_weight=labels_weight if bound.labels is not None else 0.0),
            teacher.format, what="recovering the pruned model",
            channels=yolo.channels_of(teacher, runtime, module.output_names))
    module.write_back(graph)
    out = Path(workdir) / f"{pruned.path.stem}.recovered{pruned.path.suffix}"
    save(graph, out)
    return ModelFile(out, pruned.format)


def _detector_heads(pruned: ModelFile, teacher: ModelFile, workdir: Path) -> tuple[ModelFile, ModelFile] | None:
    """Where both are TFLite detectors that end in TFLite_Detection_PostProcess, copies of both that
    end before it (tflite.detection.heads_only); else None."""
    if pruned.format != "tflite" or teacher.format != "tflite":
        return None
    from host_tools.compress.passes import progress
    from host_tools.compress.tflite.detection import heads_only

    heads = heads_only(pruned, workdir), heads_only(teacher, workdir)
    if not all(heads):
        return None
    progress("      a detector: recovering its box encodings and class scores, before TFLite_Detection_PostProcess")
    return heads


def _trainable(model: ModelFile):
    """(the model's graph, a torch module over it, how to save the graph)."""
    if model.format == "tflite":
        from host_tools.compress.tflite import flatbuffer
        from host_tools.compress.torch.tflite_module import TfliteModule

        tree, outside = flatbuffer.read(model.path)
        return tree, TfliteModule(tree), lambda tree, out: flatbuffer.write(tree, outside, out)
    import onnx

    from host_tools.compress.torch.onnx_module import OnnxModule

    proto = onnx.load(str(model.path))
    return proto, OnnxModule(proto), lambda proto, out: onnx.save(proto, str(out))


def _check_same_as_runtime(trained, model: ModelFile, data: BoundData, samples: int = 8) -> None:
    """The PyTorch reading of the graph (*trained*: SamplesFirst) must compute what its runtime does
    before it is trained: an op read differently would train a different model than the one
    written back."""
    import torch

    first = replace(data.head(samples), fixed_batch=True)
    with torch.no_grad():
        mine = [o.numpy() for o in trained(*[torch.from_numpy(np.ascontiguousarray(first.feeds[name]))
                                             for name in trained.input_names])]
    theirs = outputs_on(model.load(), first)
    for name, value in zip(trained.output_names, mine):
        want = theirs[name]
        value = value.reshape(want.shape)
        scale = float(np.abs(want).max()) or 1.0
        if not np.allclose(value, want, rtol=1e-3, atol=1e-4 * scale):
            runtime = "TFLite" if model.format == "tflite" else "ONNX Runtime"
            raise CompressionError(f"fine-tuning reads {model.path.name} differently from {runtime} (output {name}: "
                                   f"max difference {float(np.abs(value - want).max()):.3g}); not fine-tuned")
