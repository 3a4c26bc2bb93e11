"""ONNX ops as torch functions, for ``onnx_module.OnnxModule`` to run a graph op by op: ``OPS``
maps an op type to a function of (inputs, attributes) that returns its output, or a tuple of
outputs. Inputs are torch tensors (None for an omitted optional one); attributes are the node's
by name, strings as str. An op the pruning pass can meet but that is not here is refused by name
before training starts."""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch.nn import functional as F

from device_agent.errors import NotApplicable


def _conv(a, at):
    x, w, b = a[0], a[1], a[2] if len(a) > 2 else None
    dims = w.dim() - 2
    pads = _auto_pads(x, w, at) or at.get("pads", [0] * (2 * dims))
    half = len(pads) // 2
    if pads[:half] != pads[half:]:
        x = F.pad(x, [p for i in reversed(range(dims)) for p in (pads[i], pads[i + half])])
        pads = [0] * len(pads)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    return conv(x, w, b, stride=at.get("strides", 1), padding=pads[:half], dilation=at.get("dilations", 1),
                groups=at.get("group", 1))


def _conv_transpose(a, at):
    """ConvTranspose (a U-Net's or a decoder's upsampling) with explicit pads (begin and end may
    differ: computed unpadded, then cropped) and output_padding, as torch.onnx.export writes it;
    output_shape and auto_pad SAME, which make ONNX work the pads out, are refused by name."""
    x, w, b = a[0], a[1], a[2] if len(a) > 2 else None
    dims = w.dim() - 2
    if "output_shape" in at or at.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise NotApplicable("fine-tuning cannot run ConvTranspose with output_shape or auto_pad SAME in PyTorch")
    pads = at.get("pads", [0] * (2 * dims)) if at.get("auto_pad", "NOTSET") == "NOTSET" else [0] * (2 * dims)
    extra = list(at.get("output_padding", [0] * dims))
    conv = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[dims]
    y = conv(x, w, b, stride=at.get("strides", 1), output_padding=extra, groups=at.get("group", 1),
             dilation=at.get("dilations", 1))
    crop = tuple(slice(pads[i], y.shape[2 + i] - pads[i + dims]) for i in range(dims))
    return y[(slice(None), slice(None), *crop)]


def _auto_pads(x, w, at) -> list[int] | None:
    """A Conv's pads from its auto_pad (None when it has none): SAME_UPPER and SAME_LOWER pad so that
    each spatial size becomes ceil(size / stride), the odd one out at the end or at the start."""
    mode = at.get("auto_pad", "NOTSET")
    dims = w.dim() - 2
    if mode == "NOTSET":
        return None
    if mode == "VALID":
        return [0] * (2 * dims)
    strides, dilations = at.get("strides", [1] * dims), at.get("dilations", [1] * dims)
    begins, ends = [], []
    for size, kernel, stride, dilation in zip(x.shape[2:], w.shape[2:], strides, dilations):
        total = max((-(-size // stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begins.append(small if mode == "SAME_UPPER" else large)
        ends.append(large if mode == "SAME_UPPER" else small)
    return begins + ends


def _gemm(a, at):
    x, w = a[0], a[1]
    if at.get("transA", 0):
        x = x.t()
    if at.get("transB", 0):
        w = w.t()
    y = at.get("alpha", 1.0) * (x @ w)
    if len(a) > 2 and a[2] is not None:
        y = y + at.get("beta", 1.0) * a[2]
    return y


def _pool(kind):
    def run(a, at):
        x = a[0]
        kernel, strides = at["kernel_shape"], at.get("strides", at["kernel_shape"])
        pads = at.get("pads", [0] * (2 * len(kernel)))
        half = len(pads) // 2
        if kind == "max":
            fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[len(kernel)]
            return fn(x, kernel, strides, pads[:half], ceil_mode=bool(at.get("ceil_mode", 0)))
        fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[len(kernel)]
        return fn(x, kernel, strides, pads[:half], ceil_mode=bool(at.get("ceil_mode", 0)),
                  count_include_pad=bool(at.get("count_include_pad", 0)))
    return run


def _reshape(a, at):
    x, shape = a[0], [int(s) for s in a[1].tolist()]
    shape = [x.shape[i] if s == 0 and not at.get("allowzero", 0) else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _axes(a, at, index=1):
    if len(a) > index and a[index] is not None:
        return [int(v) for v in a[index].tolist()]
    return list(at.get("axes", []))


def _unsqueeze(a, at):
    x = a[0]
    for axis in sorted(ax % (x.dim() + len(_axes(a, at))) for ax in _axes(a, at)):
        x = x.unsqueeze(axis)
    return x


def _squeeze(a, at):
    axes = _axes(a, at)
    return a[0].squeeze() if not axes else a[0].squeeze(tuple(axes))


def _split(a, at):
    x, axis = a[0], at.get("axis", 0)
    sizes = a[1].tolist() if len(a) > 1 and a[1] is not None else at.get("split")
    if not sizes:
        parts = at["num_outputs"]
        size = -(-x.shape[axis] // parts)  # the last part takes what is left (ONNX's num_outputs rule)
        sizes = [min(size, x.shape[axis] - i * size) for i in range(parts)]
    return tuple(torch.split(x, list(sizes), dim=axis))


def _slice(a, at):
    x, starts, ends = a[0], a[1].tolist(), a[2].tolist()
    axes = a[3].tolist() if len(a) > 3 and a[3] is not None else list(range(len(starts)))
    steps = a[4].tolist() if len(a) > 4 and a[4] is not None else [1] * len(starts)
    index = [slice(None)] * x.dim()
    backwards = []
    for s, e, ax, st in zip(starts, ends, axes, steps):
        size = x.shape[ax]
        if st < 0:  # (torch indexing steps forwards only) Python's clamping of s and e is ONNX's
            backwards.append((ax, torch.arange(*slice(s, e, st).indices(size))))
            continue
        index[ax] = slice(max(min(s, size), -size), max(min(e, size), -size - 1) if e < 0 else min(e, size), st)
    x = x[tuple(index)]
    for ax, taken in backwards:
        x = x.index_select(ax, taken)
    return x


def _layer_norm(a, at):
    x, scale = a[0], a[1]
    axis = at.get("axis", -1) % x.dim()
    y = F.layer_norm(x, x.shape[axis:], eps=at.get("epsilon", 1e-5))
    y = y * scale
    return y + a[2] if len(a) > 2 and a[2] is not None else y


def _batch_norm(a, at):
    x, scale, bias, mean, var = a[:5]
    return F.batch_norm(x, mean, var, scale, bias, training=False, eps=at.get("epsilon", 1e-5))


def _reduce(fn):
    def run(a, at):
        axes = _axes(a, at)
        keep = bool(at.get("keepdims", 1))
        if not axes:
            return fn(a[0], dim=tuple(range(a[0].dim())), keepdim=keep)
        return fn(a[0], dim=tuple(axes), keepdim=keep)
    return run


def _resize(a, at):
    x = a[0]
    mode = at.get("mode", "nearest")
    transform = at.get("coordinate_transformation_mode", "half_pixel")
    scales = a[2] if len(a) > 2 and a[2] is not None and a[2].numel() else None
    sizes = a[3] if len(a) > 3 and a[3] is not None and a[3].numel() else None
    if mode == "nearest" and transform == "asymmetric":
        kind = "nearest"
    elif mode == "linear" and transform in ("half_pixel", "pytorch_half_pixel") and x.dim() == 4:
        kind = "bilinear"
    else:
        raise NotApplicable(f"fine-tuning cannot run Resize mode={mode} {transform}")
    if sizes is not None:
        return F.interpolate(x, size=[int(v) for v in sizes.tolist()[2:]], mode=kind)
    return F.interpolate(x, scale_factor=[float(v) for v in scales.tolist()[2:]], mode=kind)


def _instance_norm(a, at):
    return F.instance_norm(a[0], weight=a[1], bias=a[2], eps=at.get("epsilon", 1e-5))


def _constant_of_shape(a, at):
    from onnx import numpy_helper

    value = np.array(numpy_helper.to_array(at["value"])).reshape(-1) if "value" in at else np.zeros(1, np.float32)
    return torch.full([int(v) for v in a[0].tolist()], value[0].item(), dtype=_TORCH_TYPES[value.dtype.name])


def _expand(a, at):
    """Bidirectional broadcasting, as ONNX's Expand: a shape entry of 1 keeps the input's size."""
    return a[0].expand(torch.broadcast_shapes(a[0].shape, tuple(int(v) for v in a[1].tolist())))


def _gather_elements(a, at):
    axis = at.get("axis", 0) % a[0].dim()
    index = a[1].long()
    return torch.gather(a[0], axis, torch.where(index < 0, index + a[0].shape[axis], index))


def _gather_nd(a, at):
    data, index = a[0], a[1].long()
    batch = at.get("batch_dims", 0)
    if batch == 0:
        return data[tuple(index.unbind(-1))]
    leading = data.shape[:batch]  # the first batch_dims axes pair data and indices one to one
    data, index = data.reshape(-1, *data.shape[batch:]), index.reshape(-1, *index.shape[batch:])
    out = torch.stack([d[tuple(i.unbind(-1))] for d, i in zip(data, index)])
    return out.reshape(*leading, *out.shape[1:])


def _shape(a, at):
    dims = list(a[0].shape)
    return torch.tensor(dims[slice(at.get("start", 0), at.get("end"))], dtype=torch.int64)  # (start, end: opset 15)


def _cumsum(a, at):
    x, axis = a[0], int(a[1].reshape(-1)[0]) % a[0].dim()
    if at.get("reverse", 0):
        x = x.flip(axis)
    y = torch.cumsum(x, axis)
    if at.get("exclusive", 0):
        y = y - x
    return y.flip(axis) if at.get("reverse", 0) else y


def _pad(a, at):
    """Constant, reflect and edge padding, with pads as [x1_begin, x2_begin, …, x1_end, x2_end, …]
    over *axes* (every axis by default)."""
    x, pads = a[0], [int(v) for v in a[1].tolist()]
    value = a[2].item() if len(a) > 2 and a[2] is not None and a[2].numel() else 0.0
    axes = [int(v) % x.dim() for v in a[3].tolist()] if len(a) > 3 and a[3] is not None else list(range(x.dim()))
    half = len(pads) // 2
    per_axis = dict(zip(axes, zip(pads[:half], pads[half:])))
    padded = [i for i in range(x.dim()) if per_axis.get(i, (0, 0)) != (0, 0)]
    mode = at.get("mode", "constant")
    if not padded:
        return x
    if mode == "constant":
        return F.pad(x, [p for i in reversed(range(padded[0], x.dim())) for p in per_axis.get(i, (0, 0))], value=value)
    # PyTorch pads by reflection or replication only the spatial axes of [N, C, …] with 1-3 of them
    if mode not in ("reflect", "edge") or padded[0] < 2 or not 3 <= x.dim() <= 5:
        raise NotApplicable(f"fine-tuning cannot run Pad mode={mode} of these axes")
    spatial = [p for i in reversed(range(2, x.dim())) for p in per_axis.get(i, (0, 0))]
    return F.pad(x, spatial, mode="reflect" if mode == "reflect" else "replicate")


def _is_inf(a, at):
    x = a[0]
    positive = torch.isposinf(x) if at.get("detect_positive", 1) else torch.zeros_like(x, dtype=torch.bool)
    return positive | torch.isneginf(x) if at.get("detect_negative", 1) else positive


def _cast(a, at):
    from onnx import helper

    return a[0].to(_TORCH_TYPES[np.dtype(helper.tensor_dtype_to_np_dtype(at["to"])).name])


_TORCH_TYPES = {"float32": torch.float32, "float16": torch.float16, "float64": torch.float64, "int64": torch.int64,
                "int32": torch.int32, "bool": torch.bool, "int8": torch.int8, "uint8": torch.uint8}


def _constant(a, at):
    from onnx import numpy_helper

    if "value" in at:
        return torch.from_numpy(np.array(numpy_helper.to_array(at["value"])))
    for key in ("value_float", "value_int"):
        if key in at:
            return torch.tensor(at[key])
    for key in ("value_floats", "value_ints"):
        if key in at:
            return torch.tensor(list(at[key]))
    raise NotApplicable("Constant of an unsupported kind")


OPS = {
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "Gemm": _gemm,
    "MatMul": lambda a, at: a[0] @ a[1],
    "Add": lambda a, at: a[0] + a[1],
    "Sub": lambda a, at: a[0] - a[1],
    "Mul": lambda a, at: a[0] * a[1],
    "Div": lambda a, at: a[0] / a[1] if a[0].is_floating_point() else torch.div(a[0], a[1], rounding_mode="trunc"),
    "Pow": lambda a, at: a[0] ** a[1],
    "Sqrt": lambda a, at: torch.sqrt(a[0]),
    "Exp": lambda a, at: torch.exp(a[0]),
    "Neg": lambda a, at: -a[0],
    "Erf": lambda a, at: torch.erf(a[0]),
    "Relu": lambda a, at: F.relu(a[0]),
    "LeakyRelu": lambda a, at: F.leaky_relu(a[0], at.get("alpha", 0.01)),
    "PRelu": lambda a, at: torch.where(a[0] >= 0, a[0], a[0] * a[1]),
    "Sigmoid": lambda a, at: torch.sigmoid(a[0]),
    "Tanh": lambda a, at: torch.tanh(a[0]),
    "Gelu": lambda a, at: F.gelu(a[0], approximate="tanh" if at.get("approximate", "none") == "tanh" else "none"),
    "Clip": lambda a, at: torch.clamp(a[0], *(None if len(a) <= i or a[i] is None else a[i].item() for i in (1, 2))),
    "Softmax": lambda a, at: F.softmax(a[0], dim=at.get("axis", -1)),
    "Identity": lambda a, at: a[0],
    "Dropout": lambda a, at: a[0],
    "Flatten": lambda a, at: a[0].reshape(math.prod(a[0].shape[:at.get("axis", 1)]), -1),
    "Reshape": _reshape,
    "Transpose": lambda a, at: a[0].permute(*(at.get("perm") or reversed(range(a[0].dim())))),
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Concat": lambda a, at: torch.cat([t for t in a if t is not None], dim=at["axis"]),
    "Slice": _slice,
    "Split": _split,
    "Gather": lambda a, at: torch.index_select(a[0], at.get("axis", 0), a[1].reshape(-1).long()).reshape(
        (*a[0].shape[:at.get("axis", 0)], *a[1].shape, *a[0].shape[at.get("axis", 0) + 1:])),
    "Shape": _shape,
    "GatherND": _gather_nd,
    "Cast": _cast,
    "Constant": _constant,
    "MaxPool": _pool("max"),
    "AveragePool": _pool("avg"),
    "GlobalAveragePool": lambda a, at: a[0].mean(dim=tuple(range(2, a[0].dim())), keepdim=True),
    "BatchNormalization": _batch_norm,
    "LayerNormalization": _layer_norm,
    "ReduceMean": _reduce(torch.mean),
    "ReduceSum": _reduce(torch.sum),
    "ReduceL2": _reduce(lambda x, dim, keepdim: torch.sqrt(torch.sum(x * x, dim=dim, keepdim=keepdim))),
    "Where": lambda a, at: torch.where(a[0].bool(), a[1], a[2]),
    "Resize": _resize,
    "Equal": lambda a, at: a[0] == a[1],
    "Greater": lambda a, at: a[0] > a[1],
    "GreaterOrEqual": lambda a, at: a[0] >= a[1],
    "Less": lambda a, at: a[0] < a[1],
    "LessOrEqual": lambda a, at: a[0] <= a[1],
    "And": lambda a, at: a[0].bool() & a[1].bool(),
    "Or": lambda a, at: a[0].bool() | a[1].bool(),
    "Not": lambda a, at: ~a[0].bool(),
    "IsNaN": lambda a, at: torch.isnan(a[0]),
    "IsInf": _is_inf,
    "Abs": lambda a, at: torch.abs(a[0]),
    "Log": lambda a, at: torch.log(a[0]),
    "Sin": lambda a, at: torch.sin(a[0]),
    "Cos": lambda a, at: torch.cos(a[0]),
    "Reciprocal": lambda a, at: torch.reciprocal(a[0]),
    "Floor": lambda a, at: torch.floor(a[0]),
    "Min": lambda a, at: functools.reduce(torch.minimum, a),
    "Max": lambda a, at: functools.reduce(torch.maximum, a),
    "Mod": lambda a, at: torch.fmod(a[0], a[1]) if at.get("fmod", 0) else torch.remainder(a[0], a[1]),
    "ConstantOfShape": _constant_of_shape,
    "Expand": _expand,
    "GatherElements": _gather_elements,
    "CumSum": _cumsum,
    "Pad": _pad,
    "InstanceNormalization": _instance_norm,
    "Range": lambda a, at: torch.arange(a[0].item(), a[1].item(), a[2].item(), dtype=a[0].dtype),
    # the other activations the pruning pass follows (layout.UNARY_OPS), with ONNX's default constants
    "HardSigmoid": lambda a, at: torch.clamp(a[0] * at.get("alpha", 0.2) + at.get("beta", 0.5), 0, 1),
    "HardSwish": lambda a, at: a[0] * torch.clamp(a[0] / 6 + 0.5, 0, 1),
    "Elu": lambda a, at: F.elu(a[0], at.get("alpha", 1.0)),
    "Selu": lambda a, at: at.get("gamma", 1.0507009873554805) * torch.where(
        a[0] > 0, a[0], at.get("alpha", 1.6732632423543772) * torch.expm1(a[0])),
    "Softplus": lambda a, at: F.softplus(a[0]),
    "Softsign": lambda a, at: F.softsign(a[0]),
    "Mish": lambda a, at: F.mish(a[0]),
    "Celu": lambda a, at: F.celu(a[0], at.get("alpha", 1.0)),
    "ThresholdedRelu": lambda a, at: torch.where(a[0] > at.get("alpha", 1.0), a[0], torch.zeros_like(a[0])),
}
