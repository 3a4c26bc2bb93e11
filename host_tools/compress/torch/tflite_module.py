"""A float TFLite graph run by PyTorch, with its weights as trainable parameters: ``onnx_module``'s
counterpart, for fine-tuning a pruned TFLite model.

The graph is interpreted op by op in its own layout (NHWC); the float constants of weighted ops
(CONV_2D, DEPTHWISE_CONV_2D, TRANSPOSE_CONV, FULLY_CONNECTED, embedding tables) and the per-channel
constants added or multiplied (norm scales, position tables) become ``nn.Parameter``s, and
``write_back`` puts their values into the same flatbuffer. A converter bakes the batch into the
graph's shapes (a flatten to [1, 512]), so each sample runs the graph at that batch, vectorised over
the training batch with ``torch.func.vmap``. Ops outside the supported set are refused by name
before any training.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from device_agent.errors import NotApplicable
from host_tools.compress.tflite.graph import DTYPES, FLOAT32, Graph

# (a GATHER's float table is an embedding's; index tables stay constants)
WEIGHTED = {"CONV_2D": (1, 2), "DEPTHWISE_CONV_2D": (1, 2), "TRANSPOSE_CONV": (1, 3), "FULLY_CONNECTED": (1, 2),
            "GATHER": (0,), "EMBEDDING_LOOKUP": (1,)}
SCALED = {"ADD", "SUB", "MUL"}  # a float constant with a non-trivial shape read by these trains too
SAME, VALID = 0, 1  # tflite Padding


class TfliteModule(nn.Module):
    def __init__(self, tree) -> None:
        super().__init__()
        self.g = g = Graph(tree)
        unsupported = sorted(set(g.kinds) - set(_OPS))
        if unsupported:
            raise NotApplicable(f"fine-tuning cannot run op(s) {', '.join(unsupported)} in PyTorch")
        trainable = {g.input(k, i) for k, kind in enumerate(g.kinds) for i in WEIGHTED.get(kind, ())}
        trainable |= {g.input(k, i) for k, kind in enumerate(g.kinds) if kind in SCALED for i in (0, 1)
                      if g.const(g.input(k, i)) is not None and g.const(g.input(k, i)).size > 1}
        self.params = nn.ParameterDict()
        self.names: dict[int, str] = {}  # tensor -> its parameter: one per buffer (a tied embedding is one weight)
        by_buffer: dict[tuple, str] = {}
        self.consts: dict[int, torch.Tensor] = {}
        for t in range(len(g.graph.tensors)):
            value = g.const(t)
            if value is None:
                continue
            if t in trainable and g.tensor(t).type == FLOAT32:
                buffer = (g.tensor(t).buffer, value.shape)
                if buffer not in by_buffer:
                    by_buffer[buffer] = f"p{len(self.params)}"
                    self.params[by_buffer[buffer]] = nn.Parameter(torch.from_numpy(value.copy()))
                self.names[t] = by_buffer[buffer]
            else:
                self.consts[t] = torch.from_numpy(value.copy())
        # what a CAST makes: its output tensor's type
        self.casts = {k: _TORCH_TYPES[g.tensor(int(op.outputs[0])).type] for k, op in enumerate(g.ops)
                      if g.kinds[k] == "CAST" and g.tensor(int(op.outputs[0])).type in _TORCH_TYPES}
        self.inputs = [int(t) for t in g.graph.inputs]
        self.outputs = [int(t) for t in g.graph.outputs]
        self.input_names = [_name(g.tensor(t)) for t in self.inputs]
        self.output_names = [_name(g.tensor(t)) for t in self.outputs]

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """*inputs* are [N, *sample]; the graph runs each sample with the batch its shapes carry."""
        shapes = [self.g.shape(t) for t in self.inputs]
        batched = [x.reshape(x.shape[0], *shape) for x, shape in zip(inputs, shapes)]
        return torch.func.vmap(self._one)(*batched)

    def _one(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        env: dict[int, torch.Tensor] = dict(self.consts)
        env.update({t: self.params[key] for t, key in self.names.items()})
        env.update(zip(self.inputs, inputs))
        for k, op in enumerate(self.g.ops):
            args = [env[int(t)] if t >= 0 else None for t in op.inputs]
            if k in self.casts:
                env[int(op.outputs[0])] = args[0].to(self.casts[k])
                continue
            result = _OPS[self.g.kinds[k]](args, op.builtinOptions)
            for t, value in zip(op.outputs, result if isinstance(result, tuple) else (result,)):
                env[int(t)] = value
        return tuple(env[t] for t in self.outputs)

    def write_back(self, tree) -> None:
        """The trained values into *tree* (the tree this module was made from, or a copy of it)."""
        for t, key in self.names.items():
            tensor = tree.subgraphs[0].tensors[t]
            value = self.params[key].detach().cpu().numpy().astype(np.float32)
            tree.buffers[tensor.buffer].data = np.frombuffer(value.tobytes(), np.uint8).copy()


# TFLite TensorType -> torch dtype
_TORCH_TYPES = {code: torch.from_numpy(np.zeros(0, dtype)).dtype for code, dtype in DTYPES.items()}


def _name(tensor) -> str:
    return tensor.name.decode() if isinstance(tensor.name, bytes) else str(tensor.name)


def _act(x: torch.Tensor, code: int) -> torch.Tensor:
    if code == 0:
        return x
    if code == 1:
        return F.relu(x)
    if code == 2:
        return x.clamp(-1, 1)
    if code == 3:
        return x.clamp(0, 6)
    if code == 4:
        return torch.tanh(x)
    raise NotApplicable(f"fine-tuning cannot run fused activation {code}")


def _same_pad(x: torch.Tensor, kernel, stride, dilation, value=0.0) -> torch.Tensor:
    """TFLite's SAME padding of an NCHW tensor: the odd pixel goes after."""
    pads = []
    for size, k, s, d in reversed(list(zip(x.shape[2:], kernel, stride, dilation))):
        out = -(-size // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value)


def _conv(a, o, depthwise=False):
    x, w, b = a[0].permute(0, 3, 1, 2), a[1], a[2] if len(a) > 2 else None
    stride, dilation = (o.strideH, o.strideW), (o.dilationHFactor, o.dilationWFactor)
    if depthwise:  # [1, H, W, C·M] -> [C·M, 1, H, W], one group per input channel
        groups, w = x.shape[1], w.permute(3, 0, 1, 2)
    else:  # [O, H, W, I] -> [O, I, H, W]; I smaller than the input's channels: a grouped convolution
        w = w.permute(0, 3, 1, 2)
        groups = x.shape[1] // w.shape[1]
    if o.padding == SAME:
        x = _same_pad(x, w.shape[2:], stride, dilation)
    y = F.conv2d(x, w, b, stride=stride, dilation=dilation, groups=groups)
    return _act(y.permute(0, 2, 3, 1), o.fusedActivationFunction)


def _transpose_conv(a, o):
    """TRANSPOSE_CONV (inputs: the output shape, weights [O, H, W, I], the input, a bias): the full
    transposed convolution, cropped to the output shape (SAME: the odd pixel of the padding after, as
    TFLite pads), or widened with zeros where that shape is larger; then the bias."""
    shape, w, x, b = a[0], a[1], a[2].permute(0, 3, 1, 2), a[3] if len(a) > 3 else None
    y = F.conv_transpose2d(x, w.permute(3, 0, 1, 2), stride=(o.strideH, o.strideW))
    size = [int(shape[1]), int(shape[2])]
    starts = [max(full - want, 0) // 2 if o.padding == SAME else 0 for full, want in zip(y.shape[2:], size)]
    y = y[:, :, starts[0]:starts[0] + size[0], starts[1]:starts[1] + size[1]]
    y = F.pad(y, [0, size[1] - y.shape[3], 0, size[0] - y.shape[2]])
    y = y.permute(0, 2, 3, 1)
    if b is not None:
        y = y + b
    return _act(y, getattr(o, "fusedActivationFunction", 0))


def _fully_connected(a, o):
    x, w, b = a[0], a[1], a[2] if len(a) > 2 else None
    y = F.linear(x.reshape(-1, w.shape[1]), w, b)
    if o is not None and o.keepNumDims:
        y = y.reshape(*x.shape[:-1], w.shape[0])
    return _act(y, o.fusedActivationFunction if o is not None else 0)


def _pool(kind):
    def run(a, o):
        x = a[0].permute(0, 3, 1, 2)
        kernel, stride = (o.filterHeight, o.filterWidth), (o.strideH, o.strideW)
        if kind == "max":
            if o.padding == SAME:
                x = _same_pad(x, kernel, stride, (1, 1), value=float("-inf"))
            y = F.max_pool2d(x, kernel, stride)
        else:  # TFLite averages over the pixels inside the image only
            ones = torch.ones_like(x[:, :1])
            if o.padding == SAME:
                x, ones = _same_pad(x, kernel, stride, (1, 1)), _same_pad(ones, kernel, stride, (1, 1))
            y = F.avg_pool2d(x, kernel, stride) / F.avg_pool2d(ones, kernel, stride)
        return _act(y.permute(0, 2, 3, 1), o.fusedActivationFunction)
    return run


def _binary(fn):
    def run(a, o):
        code = getattr(o, "fusedActivationFunction", 0) if o is not None else 0
        return _act(fn(a[0], a[1]), code)
    return run


def _reduce(fn):
    def run(a, o):
        axes = tuple(int(v) % a[0].dim() for v in a[1].reshape(-1).tolist())
        return fn(a[0], dim=axes, keepdim=bool(o is not None and o.keepDims))
    return run


def _reshape(a, o):
    if len(a) > 1 and a[1] is not None:
        shape = [int(v) for v in a[1].reshape(-1).tolist()]
    else:
        shape = [int(v) for v in o.newShape]
    return a[0].reshape(shape)


def _slice(a, o):
    x, begin, size = a[0], a[1].tolist(), a[2].tolist()
    index = tuple(slice(b, None if s < 0 else b + s) for b, s in zip(begin, size))
    return x[index]


def _resize_nearest(a, o):
    x = a[0]
    out_h, out_w = (int(v) for v in a[1].tolist())
    for axis, (size, out) in enumerate(((x.shape[1], out_h), (x.shape[2], out_w)), start=1):
        d = torch.arange(out, dtype=torch.float64)
        if o.alignCorners and out > 1:
            src = torch.round(d * (size - 1) / (out - 1))
        elif o.halfPixelCenters:
            src = torch.floor((d + 0.5) * size / out)
        else:
            src = torch.floor(d * size / out)
        x = torch.index_select(x, axis, src.clamp(max=size - 1).long())
    return x


def _gather(a, o):
    axis = o.axis if o is not None else 0
    params, indices = a[0], a[1]
    flat = torch.index_select(params, axis, indices.reshape(-1).long())
    return flat.reshape(*params.shape[:axis], *indices.shape, *params.shape[axis + 1:])


def _pad(a, o):
    pads = a[1].tolist()
    value = float(a[2].reshape(-1)[0]) if len(a) > 2 and a[2] is not None else 0.0
    return F.pad(a[0], [p for pair in reversed(pads) for p in pair], value=value)


def _strided_slice(a, o):
    """begin/end/strides with begin, end and shrink masks (the ellipsis and new-axis masks are refused)."""
    if o is not None and (o.ellipsisMask or o.newAxisMask or o.offset):
        raise NotApplicable("fine-tuning cannot run STRIDED_SLICE with an ellipsis, a new axis or offsets")
    x, begin, end, strides = a[0], a[1].tolist(), a[2].tolist(), a[3].tolist()
    index = []
    for axis, (b, e, s) in enumerate(zip(begin, end, strides)):
        bit = 1 << axis
        if o is not None and o.shrinkAxisMask & bit:
            index.append(b)
            continue
        index.append(slice(None if o is not None and o.beginMask & bit else b,
                           None if o is not None and o.endMask & bit else e, s))
    return x[tuple(index)]


def _cumsum(a, o):
    x, axis = a[0], int(a[1].reshape(-1)[0])
    if o is not None and o.reverse:
        x = x.flip(axis)
    y = torch.cumsum(x, axis)
    if o is not None and o.exclusive:
        y = y - x
    return y.flip(axis) if o is not None and o.reverse else y


def _resize_bilinear(a, o):
    if not (o.alignCorners or o.halfPixelCenters):
        raise NotApplicable("fine-tuning cannot run RESIZE_BILINEAR without half-pixel centers or aligned corners")
    size = [int(v) for v in a[1].tolist()]
    y = F.interpolate(a[0].permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=bool(o.alignCorners))
    return y.permute(0, 2, 3, 1)


def _batch_matmul(a, o):
    x, y = a[0], a[1]
    if o is not None and o.adjX:
        x = x.transpose(-1, -2)
    if o is not None and o.adjY:
        y = y.transpose(-1, -2)
    return x @ y


_OPS = {
    "CONV_2D": _conv,
    "DEPTHWISE_CONV_2D": lambda a, o: _conv(a, o, depthwise=True),
    "TRANSPOSE_CONV": _transpose_conv,
    "FULLY_CONNECTED": _fully_connected,
    "MAX_POOL_2D": _pool("max"),
    "AVERAGE_POOL_2D": _pool("avg"),
    "ADD": _binary(torch.add),
    "SUB": _binary(torch.sub),
    "MUL": _binary(torch.mul),
    "DIV": _binary(torch.div),
    "MAXIMUM": _binary(torch.maximum),
    "MINIMUM": _binary(torch.minimum),
    "SQUARED_DIFFERENCE": _binary(lambda x, y: (x - y) ** 2),
    "POW": _binary(torch.pow),
    "RELU": lambda a, o: F.relu(a[0]),
    "RELU6": lambda a, o: a[0].clamp(0, 6),
    "RELU_N1_TO_1": lambda a, o: a[0].clamp(-1, 1),
    "LOGISTIC": lambda a, o: torch.sigmoid(a[0]),
    "TANH": lambda a, o: torch.tanh(a[0]),
    "GELU": lambda a, o: F.gelu(a[0], approximate="tanh" if o is not None and o.approximate else "none"),
    "HARD_SWISH": lambda a, o: F.hardswish(a[0]),
    "LEAKY_RELU": lambda a, o: F.leaky_relu(a[0], o.alpha),
    "RSQRT": lambda a, o: torch.rsqrt(a[0]),
    "SQRT": lambda a, o: torch.sqrt(a[0]),
    "EXP": lambda a, o: torch.exp(a[0]),
    "COS": lambda a, o: torch.cos(a[0]),
    "SIN": lambda a, o: torch.sin(a[0]),
    "ABS": lambda a, o: torch.abs(a[0]),
    "NEG": lambda a, o: -a[0],
    "SQUARE": lambda a, o: a[0] * a[0],
    "SOFTMAX": lambda a, o: F.softmax(a[0] * (o.beta if o is not None else 1.0), dim=-1),
    "MEAN": _reduce(torch.mean),
    "SUM": _reduce(torch.sum),
    "REDUCE_MAX": _reduce(torch.amax),
    "REDUCE_MIN": _reduce(torch.amin),
    "REVERSE_V2": lambda a, o: torch.flip(a[0], [int(v) for v in a[1].reshape(-1).tolist()]),
    "RESHAPE": _reshape,
    "SQUEEZE": lambda a, o: a[0].squeeze(tuple(o.squeezeDims)) if o is not None and o.squeezeDims is not None
    and len(o.squeezeDims) else a[0].squeeze(),
    "EXPAND_DIMS": lambda a, o: a[0].unsqueeze(int(a[1].reshape(-1)[0])),
    "TRANSPOSE": lambda a, o: a[0].permute(*[int(p) for p in a[1].tolist()]),
    "CONCATENATION": lambda a, o: _act(torch.cat(a, dim=o.axis), o.fusedActivationFunction),
    "SLICE": _slice,
    "PAD": _pad,
    "PADV2": _pad,
    "BATCH_MATMUL": _batch_matmul,
    "RESIZE_NEAREST_NEIGHBOR": _resize_nearest,
    "GATHER": _gather,
    "GATHER_ND": lambda a, o: a[0][tuple(a[1].long().unbind(-1))],
    "SELECT": lambda a, o: torch.where(a[0].bool(), a[1], a[2]),
    "SELECT_V2": lambda a, o: torch.where(a[0].bool(), a[1], a[2]),
    "LOGICAL_AND": lambda a, o: torch.logical_and(a[0], a[1]),
    "LESS": lambda a, o: a[0] < a[1],
    "NOT_EQUAL": lambda a, o: a[0] != a[1],
    "LOG": lambda a, o: torch.log(a[0]),
    "CUMSUM": _cumsum,
    "STRIDED_SLICE": _strided_slice,
    "RESIZE_BILINEAR": _resize_bilinear,
    "CAST": lambda a, o: a[0],  # (TfliteModule casts to the output tensor's type before it gets here)
    "BROADCAST_TO": lambda a, o: torch.broadcast_to(a[0], [int(v) for v in a[1].tolist()]),
    "EMBEDDING_LOOKUP": lambda a, o: torch.index_select(a[1], 0, a[0].reshape(-1).long()).reshape(
        *a[0].shape, *a[1].shape[1:]),
}
