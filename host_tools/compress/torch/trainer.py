"""Knowledge distillation: a student learns the teacher's outputs on the user's inputs.

The teacher is any model a runtime can run (ONNX or TFLite); its outputs on the training
inputs are computed once. Classifier outputs are matched with temperature-scaled soft targets
(Hinton et al.: T^2 * KL(student/T || teacher/T)) plus cross-entropy on hard labels when the
data has them; other outputs with a mean squared error scaled by the teacher's variance.
A classifier that ends in a softmax (probabilities: many TFLite and Keras models) is matched on
log-probabilities, the logits up to a constant: tempering the probabilities themselves would
flatten the targets to nearly uniform.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from device_agent.errors import NotApplicable
from host_tools.compress.data import BoundData
from host_tools.compress.detections import is_ragged
from host_tools.compress.evaluate import IGNORED, box_outputs, class_axis, class_labels, outputs_on
from host_tools.compress.passes import progress


@dataclass(frozen=True)
class Schedule:
    epochs: int
    lr: float = 3e-3
    batch: int = 64
    temperature: float = 4.0
    labels_weight: float = 0.5  # share of the hard-label loss when labels exist
    seed: int = 0

    def detector_batch(self, samples: int) -> int:
        """A detection head's batch for *samples*: at most *batch*, and smaller where that would give
        an epoch fewer than STEPS steps (no fewer than MIN_BATCH samples). A few hundred images, a
        detector's usual training set, make 4 steps an epoch at 64. A YOLO11n trained here (mAP50-95
        0.78), half its channels pruned, recovered in 30 epochs of 256 images to 0.57 in batches of
        16 and 0.63 in batches of 8 (with the anchors weighed as _head_loss weighs them; 0.22 in
        batches of 64 and 0.39 of 16 before). Classifiers keep *batch*: at the same learning rate,
        smaller batches recovered the reference transformer and the U-Net test fixture less."""
        return max(1, min(self.batch, max(MIN_BATCH, samples // STEPS)))


STEPS, MIN_BATCH = 32, 8


class SamplesFirst(torch.nn.Module):
    """*module*, which takes and gives tensors where the model batches them (a recurrent state
    [layers, batch, hidden]: data.batch_axes), called with and giving every tensor samples first,
    as the training data and the teacher's targets hold them."""

    def __init__(self, module: torch.nn.Module, inputs: list[str], outputs: list[str], axes: dict[str, int]) -> None:
        super().__init__()
        self.module, self.input_names, self.output_names = module, inputs, outputs
        self.axes = [axes.get(n, 0) for n in inputs], [axes.get(n, 0) for n in outputs]

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.module(*[x.movedim(0, axis) for x, axis in zip(inputs, self.axes[0])])
        outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
        return tuple(o.movedim(axis, 0) for o, axis in zip(outputs, self.axes[1]))


def probabilities(output: np.ndarray, axis: int | None) -> bool:
    """Whether *output* holds a probability distribution along *axis* (class_axis) in every sample:
    a softmax's output, non-negative and summing to 1."""
    if axis is None or output.size == 0 or output.min() < 0:
        return False
    return bool(np.allclose(output.sum(axis=axis, dtype=np.float64), 1.0, atol=1e-3))


def teacher_targets(teacher, data: BoundData) -> dict[str, np.ndarray]:
    """The teacher's outputs by name (*teacher*: a loaded model, ModelFile.load) on the training inputs;
    NotApplicable for a model that cannot train on batches (see trainable)."""
    trainable(data)
    targets = outputs_on(teacher, data)
    ragged = next((name for name, value in targets.items() if is_ragged(value)), None)
    if ragged:
        raise NotApplicable(f"the size of output {ragged!r} depends on the input (detections after NMS): "
                            "training needs outputs of one shape for every sample")
    return targets


def trainable(data: BoundData) -> None:
    """NotApplicable where *data*'s model takes one sample with no batch axis: a student or a
    fine-tuned copy trains on batches, and would not take what the model takes."""
    if data.unbatched:
        raise NotApplicable(f"input {sorted(data.unbatched)[0]!r} takes one sample with no batch axis: "
                            "training runs on batches")


def distill(student: torch.nn.Module, inputs: list[np.ndarray], targets: list[np.ndarray],
            labels: np.ndarray | None, schedule: Schedule, model_format: str, what: str = "training",
            channels: Mapping[int, tuple[int, slice]] | None = None) -> float:
    """Train *student* (called with the inputs in order, returning a tuple of outputs) to match
    *targets*, the outputs of a *model_format* teacher (which says where their class scores are:
    evaluate.class_axis; a raw detection head's boxes are values, evaluate.box_outputs; *channels*:
    the outputs, by index, that hold values of several kinds along an axis, as a YOLO head's boxes
    in pixels beside scores from 0 to 1: (that axis, where its scores are), see _head_loss); returns
    its loss on all of them afterwards. Training that ends with a
    higher loss than it started from gives the weights back as they were (a pruned model recovered
    on a few inputs can drift away from its teacher)."""
    torch.manual_seed(schedule.seed)
    generator = torch.Generator().manual_seed(schedule.seed)
    xs = [torch.from_numpy(np.ascontiguousarray(x)) for x in inputs]
    ts = [torch.from_numpy(np.ascontiguousarray(t)).float() for t in targets]
    indices = class_labels(labels, targets[0], model_format)  # (the first output's classes; IGNORED: none)
    ys = torch.from_numpy(indices) if indices is not None else None
    channels = channels or {}
    scales = [_spread(t, channels[i][0] if i in channels else None) for i, t in enumerate(ts)]
    heads = [channels.get(i) for i in range(len(ts))]
    values = box_outputs(dict(enumerate(targets))) | set(channels)
    axes = [None if i in values else class_axis(t, model_format) for i, t in enumerate(targets)]
    softmaxed = [probabilities(t, a) for t, a in zip(targets, axes)]

    def loss_of(part) -> torch.Tensor:
        """The student's loss on the samples *part* (a slice or indices), summed over its outputs."""
        outs = student(*[x[part] for x in xs])
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        return sum(_loss(o, t[part], None if ys is None else ys[part], s, a, p, schedule, h)
                   for o, t, s, a, p, h in zip(outs, ts, scales, axes, softmaxed, heads))

    def loss_on_all() -> float:
        student.eval()
        with torch.no_grad():
            total = 0.0
            for start in range(0, len(xs[0]), schedule.batch):
                part = slice(start, start + schedule.batch)
                total += float(loss_of(part)) * len(xs[0][part])
        return total / len(xs[0])

    batch = schedule.detector_batch(len(xs[0])) if channels else schedule.batch
    before, start_state = loss_on_all(), {k: v.detach().clone() for k, v in student.state_dict().items()}
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=schedule.lr)
    steps_per_epoch = max(1, -(-len(xs[0]) // batch))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=schedule.epochs * steps_per_epoch)
    student.train()
    progress(f"      {what}: {len(xs[0])} samples{', labelled' if ys is not None else ''}, {schedule.epochs} epochs, "
             f"batches of {batch}")
    for epoch in range(schedule.epochs):
        order = torch.randperm(len(xs[0]), generator=generator)
        total = 0.0
        for start in range(0, len(order), batch):
            idx = order[start:start + batch]
            loss = loss_of(idx)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        if (epoch + 1) % max(1, schedule.epochs // 5) == 0:
            progress(f"      {what}: epoch {epoch + 1}/{schedule.epochs}, loss {total / len(order):.4f}")
    after = loss_on_all()
    if after > before:
        student.load_state_dict(start_state)
        progress(f"      {what}: the loss rose ({before:.4g} -> {after:.4g}); the weights it started from are kept")
        return before
    return after


def _loss(out: torch.Tensor, target: torch.Tensor, labels, scale, axis: int | None, softmaxed: bool,
          schedule: Schedule, head: tuple[int, slice] | None = None) -> torch.Tensor:
    """*axis*: where the target's class scores are (class_axis), or None for an output of other values;
    *softmaxed*: they are probabilities; so should the student's be (a pruned graph keeps its softmax, a
    built-in student is given one), else its outputs are taken as its logits. *head*: see _head_loss."""
    out = out.reshape(target.shape)
    if head is not None:
        return _head_loss(out, target, scale, *head)
    if axis is not None:
        out, target = out.movedim(axis, -1), target.movedim(axis, -1)  # the scores last
        if softmaxed:  # log-probabilities: the logits, up to a constant per sample
            target = torch.log(target.clamp_min(1e-12))
            distribution = probabilities(out.detach().cpu().numpy(), out.dim() - 1)
            out = torch.log(out.clamp_min(1e-12)) if distribution else F.log_softmax(out, dim=-1)
        t = schedule.temperature
        soft = F.kl_div(F.log_softmax(out / t, dim=-1), F.softmax(target / t, dim=-1),
                        reduction="batchmean") * t * t
        if (labels is not None and schedule.labels_weight > 0 and labels.shape == out.shape[:-1]
                and bool((labels != IGNORED).any())):  # (a batch of ignored labels only: no hard loss)
            hard = F.cross_entropy(out.reshape(-1, out.shape[-1]), labels.reshape(-1), ignore_index=IGNORED)
            return (1 - schedule.labels_weight) * soft + schedule.labels_weight * hard
        return soft
    return (F.mse_loss(out, target, reduction="none") / scale).mean()


def _head_loss(out: torch.Tensor, target: torch.Tensor, scale: torch.Tensor, axis: int, scores: slice) -> torch.Tensor:
    """A detection head's loss: of the channels along *axis* at *scores* (each box's class scores
    after their sigmoid), binary cross-entropy against the teacher's, whose gradient does not vanish
    where a pruned model's scores sit at 0; of the others (boxes in pixels, keypoints, mask
    coefficients), the squared error over each channel's own spread (*scale*, _spread), each anchor's
    weighed by the teacher's best score there: the boxes of anchors that find nothing are never
    detections, and most anchors find nothing."""
    out, target, scale = out.movedim(axis, -1), target.movedim(axis, -1), scale.movedim(axis, -1)
    picked = torch.zeros(target.shape[-1], dtype=torch.bool)
    picked[scores] = True
    bce = F.binary_cross_entropy(out[..., picked].clamp(0, 1), target[..., picked].clamp(0, 1))
    if bool(picked.all()):
        return bce
    confidence = target[..., picked].clamp(0, 1).amax(dim=-1, keepdim=True)
    error = ((out - target) ** 2 / scale)[..., ~picked] * confidence
    return bce + error.sum() / (confidence.sum() * error.shape[-1]).clamp_min(1e-6)


def _spread(target: torch.Tensor, axis: int | None) -> torch.Tensor:
    """The variance of *target*, or of each of its channels along *axis* (shaped to divide it)."""
    if axis is None:
        return target.var().clamp_min(1e-8)
    others = [d for d in range(target.dim()) if d != axis]
    return target.var(dim=others, keepdim=True).clamp_min(1e-6)
