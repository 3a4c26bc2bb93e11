"""TensorFlow Lite (LiteRT) behind the ModelRuntime interface.

The interpreter comes from the first package present: ``ai_edge_litert`` (LiteRT,
the current name), ``tflite_runtime`` (the older slim wheel, common on Pis), then
full TensorFlow. A TFLite interpreter is not thread-safe, so calls are serialised.

A fully integer-quantized model with int8 inputs and outputs (a scale and zero point each) still
takes and gives float32 here: inputs are quantized and outputs dequantized at the edge, so
callers, health-check samples and telemetry do not change with the model's precision. (edgefleet's
own full int8 keeps float32 inputs and outputs inside the model unless told `io=int8`: the
interpreter's conversion costs less than this one in NumPy.)

A model with variable tensors — the state of an LSTM that TensorFlow's converter fused into one
UNIDIRECTIONAL_SEQUENCE_LSTM, as it does with a Keras LSTM — would carry its state from one call
into the next: the interpreter leaves the last call's state there, so the same input gives another
answer, and a keyword spotter scored at chance. Those variables are reset before every call, so
each call stands alone as it does in ONNX Runtime; a streaming model takes its state as an input
and gives it back as an output.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import sys
import tempfile
import threading
from pathlib import Path
from typing import Mapping

import numpy as np

from device_agent.bundle.manifest import TensorSpec
from device_agent.errors import ModelError
from device_agent.runtime.base import RuntimeOptions, first_line

INTERPRETER_MODULES = ("ai_edge_litert.interpreter", "tflite_runtime.interpreter", "tensorflow.lite")


def find_interpreter():
    """The Interpreter class of the first TFLite package installed, and the package's name."""
    for module_name in INTERPRETER_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        return module.Interpreter, module_name.split(".")[0]
    raise ModelError("no TFLite runtime installed: pip install ai-edge-litert (or tflite-runtime)")


class TFLiteRuntime:
    name = "tflite"

    def __init__(self, model_path: Path, options: RuntimeOptions = RuntimeOptions()) -> None:
        interpreter_cls, self.package = find_interpreter()
        try:
            with _without_delegate_banner():
                self._interpreter = interpreter_cls(model_path=str(model_path), num_threads=options.threads)
                self._interpreter.allocate_tensors()
        except Exception as exc:  # the interpreter raises ValueError/RuntimeError with C++ text
            raise ModelError(f"TFLite cannot load {Path(model_path).name}: {_why_not(Path(model_path), exc)}") \
                from None
        self._lock = threading.Lock()
        self._stateful = _keeps_state(Path(model_path))
        self._read_ports()
        self._inputs = tuple(_spec(d) for d in self._interpreter.get_input_details())
        self._outputs = tuple(_spec(d) for d in self._interpreter.get_output_details())
        # (boxes, classes, scores, count) where the model ends in TFLite's detection post-processing
        self.padded_detections = _padded_detections(Path(model_path), self._out_ports)

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._outputs

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Everything a call needs was read from the interpreter beforehand (_Port): looking it up in
        # the interpreter's detail dicts on every call cost 1-2.5 µs more a call of the reference CNN
        # (benchmarks/runtime_call.py; 7 µs in the compression benchmark's interleaved timing).
        with self._lock:
            ports, reshaped = self._in_ports, False  # (as they are: a resize reads new ones)
            try:
                values = []
                for port in ports:
                    value = self._take(port, feeds)
                    reshaped = reshaped or value.shape != port.shape
                    values.append(value)
                if reshaped:  # dynamic dimensions: resized to what this call brings
                    self._resize_to([value.shape for value in values])
                set_tensor, get_tensor = self._interpreter.set_tensor, self._interpreter.get_tensor
                for port, value in zip(self._in_ports, values):
                    set_tensor(port.index, value)
                if self._stateful:
                    self._interpreter.reset_all_variables()
                self._interpreter.invoke()
                # get_tensor hands back a copy, which the caller may keep across calls.
                outputs = {}
                for port in self._out_ports:
                    value = get_tensor(port.index)
                    outputs[port.name] = value if port.scale is None else port.dequantize(value)
                return outputs
            except ModelError:
                raise
            except Exception as exc:
                if not reshaped:
                    raise ModelError(f"inference failed: {first_line(exc)}") from None
                # back to the last shapes that ran: left at these, every later call would fail too
                self._resize_to([port.shape for port in ports])
                raise ModelError(f"inference failed: {self._not_at(values, exc)}") from None

    def _take(self, port: _Port, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        try:
            value = feeds[port.name]
        except KeyError:
            missing = [p.name for p in self._in_ports if p.name not in feeds]
            raise ModelError(f"inference failed: missing input(s) {', '.join(missing)}") from None
        if type(value) is not np.ndarray:
            value = np.asarray(value)
        if port.scale is not None and value.dtype.kind == "f":
            value = port.quantize(value)
        if value.dtype != port.dtype:
            raise ModelError(f"inference failed: input {port.name!r} is {value.dtype}, "
                             f"the model takes {port.dtype.name}")
        return value

    def _not_at(self, values: list[np.ndarray], exc: Exception) -> str:
        """Why a call at new input shapes failed. TFLite resizes any dimension on request, but a model
        whose converter fixed one may not run at another size, and the kernel says so in C++ terms
        ("…unidirectional_sequence_lstm.cc:980 NumElements(output_state) != … Node number 2 (…)
        failed to prepare."): the input, its shape and the model's are named, with the node."""
        node = re.search(r"Node number \d+ \(\w+\) failed to \w+", str(exc))
        for spec, value in zip(self._inputs, values):
            if len(spec.shape) != value.ndim or any(d not in ("?", n) for d, n in zip(spec.shape, value.shape)):
                return (f"input {spec.name!r} is {list(value.shape)}, the model takes "
                        f"{[d if d != '?' else 'any' for d in spec.shape]} and does not run at that shape"
                        + (f" ({node.group(0)})" if node else f": {first_line(exc)}"))
        return first_line(exc)

    def _resize_to(self, shapes: list[tuple[int, ...]]) -> None:
        """Every input at *shapes*, then the tensors re-allocated once. Each is resized, even one
        whose port says it is there already: after a failed allocation the ports are not the
        interpreter's (TFLite leaves an input already at the shape as it is)."""
        for port, shape in zip(self._in_ports, shapes):
            self._interpreter.resize_tensor_input(port.index, list(shape))
        self._interpreter.allocate_tensors()
        self._read_ports()

    def _read_ports(self) -> None:
        self._in_ports = tuple(_Port(d) for d in self._interpreter.get_input_details())
        self._out_ports = tuple(_Port(d) for d in self._interpreter.get_output_details())


_BANNER = b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
_banner_due = True  # TFLite prints it once a process, when the first interpreter allocates its tensors


@contextlib.contextmanager
def _without_delegate_banner():
    """Around the process's first interpreter: TFLite's C++ writes *_BANNER* straight to file
    descriptor 2 (no setting turns it off), which put it at the top of every `edgefleet compress`
    of a TFLite model and in the agent's journal at each start. Whatever else C++ writes there
    meanwhile (a kernel's error) is passed on when the interpreter is built."""
    global _banner_due
    if not _banner_due:
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no stderr to take over
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
            _banner_due = False
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            kept = [line for line in sink.read().splitlines(keepends=True) if not line.startswith(_BANNER)]
            if kept:
                os.write(2, b"".join(kept))


def _why_not(path: Path, exc: Exception) -> str:
    """Why the interpreter refused the model, in one line. A model converted with TensorFlow's
    select ops (SELECT_TF_OPS) gets a paragraph about Android's Flex dependency run into "Node
    number 3 (FlexMatrixDeterminant) failed to prepare"; it is named, with the way out."""
    flex = sorted({code[len("Flex"):] for code in _custom_codes(path) if code.startswith("Flex")})
    if flex and "Select TensorFlow op" in str(exc):
        return (f"it uses TensorFlow ops that TFLite runs only with the Flex delegate, which this TFLite package "
                f"lacks ({', '.join(flex)}): convert the model with TFLITE_BUILTINS alone")
    return first_line(exc)


def _packed(path: Path):
    """The model's flatbuffer, read lazily with LiteRT's schema; None without the schema
    (tflite-runtime)."""
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:
        return None
    return schema.Model.GetRootAs(path.read_bytes(), 0)


def _custom_codes(path: Path) -> list[str]:
    """The model's custom operator names ("FlexMatrixDeterminant"); none where it cannot be read."""
    try:
        model = _packed(path)
        codes = (model.OperatorCodes(i) for i in range(model.OperatorCodesLength())) if model is not None else ()
        return [code.CustomCode().decode(errors="replace") for code in codes if code.CustomCode()]
    except Exception:  # noqa: BLE001 — not a flatbuffer (the interpreter said why): nothing to name
        return []


def _padded_detections(path: Path, outputs: tuple["_Port", ...]) -> tuple[str, ...] | None:
    """The names of the outputs the model's detection post-processing op (detections.POSTPROCESS_OP)
    gives, in its order: boxes, classes, scores, count (through a QUANTIZE or DEQUANTIZE, which full
    int8 adds); None where it has no such op, or cannot be read (tflite-runtime has no schema)."""
    from device_agent.detections import POSTPROCESS_OP

    try:
        model = _packed(path)
        if model is None:
            return None
        graph, codes = model.Subgraphs(0), [model.OperatorCodes(i) for i in range(model.OperatorCodesLength())]
        ops = [graph.Operators(k) for k in range(graph.OperatorsLength())]
        maker = {op.Outputs(p): (op, p) for op in ops for p in range(op.OutputsLength())}

        def kind(op) -> str:
            code = codes[op.OpcodeIndex()]
            return (code.CustomCode() or b"").decode(errors="replace") or str(max(code.BuiltinCode(),
                                                                                   code.DeprecatedBuiltinCode()))
        from ai_edge_litert.schema_py_generated import BuiltinOperator

        passing = {str(BuiltinOperator.QUANTIZE), str(BuiltinOperator.DEQUANTIZE)}  # (they change the type only)
        found = {}
        for port in outputs:
            op, position = maker.get(port.index, (None, 0))
            while op is not None and kind(op) in passing:
                op, position = maker.get(op.Inputs(0), (None, 0))
            if op is not None and kind(op) == POSTPROCESS_OP:
                found[position] = port.name
    except Exception:  # noqa: BLE001 — not readable: compared value by value, as before
        return None
    return tuple(found[p] for p in range(4)) if sorted(found) == [0, 1, 2, 3] else None


def _keeps_state(path: Path) -> bool:
    """Whether the model has variable tensors (state the interpreter keeps between calls). Where
    it cannot be read (tflite-runtime has no schema), taken as yes: a reset costs about a
    microsecond, one call's state in the next a wrong answer."""
    model = _packed(path)
    return model is None or any(graph.Tensors(t).IsVariable()
                                for graph in map(model.Subgraphs, range(model.SubgraphsLength()))
                                for t in range(graph.TensorsLength()))


class _Port:
    """One input or output tensor of the interpreter, as a call uses it."""

    __slots__ = ("name", "index", "dtype", "shape", "scale", "zero_point", "low", "high")

    def __init__(self, detail: dict) -> None:
        self.name = detail["name"]
        self.index = detail["index"]
        self.dtype = np.dtype(detail["dtype"])
        self.shape = tuple(int(d) for d in detail["shape"])
        # A quantized tensor's real values are scale * (q - zero_point); None for a float tensor.
        self.scale, self.zero_point = detail["quantization"] if _quantized(detail) else (None, 0)
        if self.scale is not None:
            info = np.iinfo(self.dtype)
            self.low, self.high = int(info.min), int(info.max)

    # Both in place on one new array, a ufunc call per step: np.iinfo, np.clip and the temporaries
    # of the plain expressions cost 6.7 µs a call of the reference CNN's 64 inputs, more than
    # its full-int8 interpreter takes (4.5 µs).
    def quantize(self, value: np.ndarray) -> np.ndarray:
        scaled = np.divide(value, self.scale)
        np.rint(scaled, out=scaled)  # half to even, as np.round
        np.add(scaled, self.zero_point, out=scaled)
        np.maximum(scaled, self.low, out=scaled)
        np.minimum(scaled, self.high, out=scaled)
        return scaled.astype(self.dtype)

    def dequantize(self, value: np.ndarray) -> np.ndarray:
        real = value.astype(np.float32)
        np.subtract(real, self.zero_point, out=real)
        np.multiply(real, self.scale, out=real)
        return real


def _spec(detail: dict) -> TensorSpec:
    signature = detail.get("shape_signature")
    dims = signature if signature is not None and len(signature) else detail["shape"]
    return TensorSpec(name=detail["name"], shape=tuple(int(d) if d >= 0 else "?" for d in dims),
                      dtype="float32" if _quantized(detail) else np.dtype(detail["dtype"]).name)


def _quantized(detail: dict) -> bool:
    """An integer tensor with one scale: it stands for real values (scale * (q - zero_point))."""
    scale, _ = detail.get("quantization", (0.0, 0))
    return np.dtype(detail["dtype"]).kind in "iu" and scale > 0
