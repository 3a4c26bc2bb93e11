"""The `distill` pass: train a smaller student on the teacher's outputs and export it to ONNX."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from device_agent.errors import ConfigError, NotApplicable
from host_tools.compress import evaluate, yolo
from host_tools.compress.data import BoundData, Dataset, load_dataset
from host_tools.compress.model import ModelFile
from host_tools.compress.passes import Pass, PassConfig, failing_as, register


@register
class Distill(Pass):
    """The teacher is the model the recipe has so far (ONNX or TFLite, run by its runtime); the
    student a member of the built-in family sized to a parameter budget, or the user's module."""

    name = "distill"
    formats = ("onnx", "tflite")
    summary = "knowledge distillation into a smaller student (PyTorch), exported to ONNX"
    requires = ("torch",)
    extra = "distill"

    @dataclass(frozen=True)
    class Config(PassConfig):
        calibration: Dataset | str | None = field(default=None, metadata={
            "help": "inputs to train on, labels optional (default: --train, else --calib)", "required": True,
            "trains": True})
        student: str = field(default="auto", metadata={
            "help": "auto | cnn | mlp | bag, or FILE.py:CLASS / MODULE:CLASS for your own nn.Module"})
        params: float = field(default=0.25, metadata={
            "help": "family students: at most this fraction of the teacher's parameters"})
        depth: int = field(default=2, metadata={"help": "family students: layers"})
        epochs: int = field(default=60, metadata={"help": "training epochs"})
        temperature: float = field(default=4.0, metadata={"help": "softening of the teacher's logits"})
        labels_weight: float = field(default=0.5, metadata={
            "help": "share of the hard-label loss when the data has labels"})
        lr: float = field(default=3e-3, metadata={"help": "Adam learning rate (cosine decay)"})
        seed: int = field(default=0, metadata={"help": "for a reproducible student"})

        def __post_init__(self) -> None:  # (see PassConfig)
            if not 0 < self.params <= 1:
                raise ValueError(f"params must be above 0 and at most 1 (of the teacher's), not {self.params}")
            if self.depth < 1 or self.epochs < 1:
                raise ValueError(f"depth and epochs must be 1 or more, not {self.depth} and {self.epochs}")
            if self.temperature <= 0 or self.lr <= 0:
                raise ValueError(f"temperature and lr must be above 0, not {self.temperature} and {self.lr}")
            if not 0 <= self.labels_weight <= 1:
                raise ValueError(f"labels_weight must be between 0 and 1, not {self.labels_weight}")

    def run(self, model, config, workdir):
        import torch

        from host_tools.compress.torch import students
        from host_tools.compress.torch.trainer import SamplesFirst, Schedule, distill, probabilities, teacher_targets

        if config.calibration is None:
            raise ConfigError(f"{self.name} needs inputs to train on (--train or --calib)")
        runtime = model.load()
        bound = evaluate.bind(load_dataset(config.calibration), runtime)
        targets = list(teacher_targets(runtime, bound).values())
        # (a float16 model's inputs: the student trains in float32, and _export gives it the model's types)
        inputs = [_float32(bound.feeds[s.name]) for s in runtime.inputs]
        torch.manual_seed(config.seed)
        if config.student not in ("auto", *students.FAMILIES):
            student = students.user_module(config.student)
        else:
            if len(inputs) != 1 or len(targets) != 1 or targets[0].ndim != 2:
                raise NotApplicable("the built-in students take one input and give one [N, classes] output; "
                                    "give your own module with student=FILE.py:CLASS")
            sample = torch.from_numpy(inputs[0][:2])
            family = students.family_for(sample) if config.student == "auto" else config.student
            budget = int(teacher_parameters(model) * config.params)
            vocab = int(inputs[0].max()) + 1 if family == "bag" else 0
            student = students.fit(family, sample, targets[0].shape[1], config.depth, budget, vocab)
            # the teacher ends in a softmax: the student does too
            if probabilities(targets[0], evaluate.class_axis(targets[0], model.format)):
                student = torch.nn.Sequential(student, torch.nn.Softmax(dim=1))
        names = [s.name for s in runtime.inputs], [s.name for s in runtime.outputs]
        with failing_as(self.name, model):  # a student that does not fit the inputs: PyTorch's error, in one line
            distill(SamplesFirst(student, *names, bound.axes), inputs, targets, bound.labels,
                    Schedule(epochs=config.epochs, lr=config.lr, temperature=config.temperature,
                             labels_weight=config.labels_weight if bound.labels is not None else 0.0,
                             seed=config.seed),
                    model.format, what=f"distilling into a {students.count(student)}-parameter student",
                    channels=yolo.channels_of(model, runtime, names[1]))
        out = workdir / f"{model.path.stem}.student.onnx"
        _export(student, bound, runtime, out)
        return ModelFile(out, "onnx")


def teacher_parameters(model: ModelFile) -> int:
    """Weights stored in the model: ONNX initializers, or a TFLite model's constant tensors."""
    if model.format == "onnx":
        import onnx

        graph = onnx.load(str(model.path), load_external_data=False).graph
        return sum(int(np.prod(i.dims)) for i in graph.initializer if len(i.dims) >= 1)
    from device_agent.runtime.tflite import find_interpreter

    interpreter_cls, _ = find_interpreter()
    interpreter = interpreter_cls(model_path=str(model.path))
    produced = {i for op in interpreter._get_ops_details() for i in op["outputs"]}  # noqa: SLF001
    inputs = {d["index"] for d in interpreter.get_input_details()}
    return sum(int(np.prod(t["shape"])) for t in interpreter.get_tensor_details()
               if t["index"] not in produced | inputs and len(t["shape"]) >= 1)


def _export(student, bound: BoundData, runtime, out) -> None:
    """*student* to ONNX, with the teacher's input and output names, each batched where the
    teacher's is (an input fixed at a batch of one stays so)."""
    import torch

    names = [s.name for s in runtime.inputs]
    outputs = [s.name for s in runtime.outputs]
    axes = {name: bound.axes.get(name, 0) for name in names + outputs}
    dynamic = {s.name: {axes[s.name]: "batch"} for s in runtime.inputs if s.shape[axes[s.name]:][:1] != (1,)}
    dynamic.update({name: {axes[name]: "batch"} for name in outputs} if dynamic else {})
    first = bound.sample(0)
    example = tuple(torch.from_numpy(first[name]) for name in names)
    if any(s.dtype == "float16" for s in (*runtime.inputs, *runtime.outputs)):
        student = _taking_float16(student, [s.dtype == "float16" for s in runtime.outputs])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter announces its own deprecation
            torch.onnx.export(student.eval(), example, str(out), input_names=names, output_names=outputs,
                              dynamic_axes=dynamic or None, opset_version=17, dynamo=False)
    except Exception as exc:  # torch's exporter raises a wide variety
        raise NotApplicable(f"the student does not export to ONNX: {type(exc).__name__}: {exc}") from None


def _float32(array: np.ndarray) -> np.ndarray:
    return array.astype(np.float32) if array.dtype == np.float16 else array


def _taking_float16(student, halves: list[bool]):
    """*student* (trained in float32) taking a float16 model's float16 inputs and giving float16
    where the model's outputs are, so that it replaces the model for its callers."""
    import torch

    class TakingFloat16(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.student = student

        def forward(self, *inputs):
            outputs = self.student(*[x.float() if x.dtype == torch.float16 else x for x in inputs])
            many = isinstance(outputs, (tuple, list))
            outputs = [o.half() if half else o for o, half in zip(outputs if many else (outputs,), halves)]
            return tuple(outputs) if many else outputs[0]

    return TakingFloat16()
