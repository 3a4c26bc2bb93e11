"""Convert reference models to TensorFlow Lite with Google's PyPI converter (litert-torch).

    python models/convert_digits_tflite.py                      # digits_cnn
    python models/convert_digits_tflite.py digits_transformer   # or any of REFERENCE

Writes, next to this script, for each model NAME:
  NAME.tflite        the same fp32 weights as NAME.onnx, as a LiteRT flatbuffer
                     (input [1,1,8,8] float32, output [1,10] float32)
  NAME_tflite.json   how it was made and the held-out accuracy LiteRT reaches with it

The weights are read from NAME.onnx (not retrained), so both files hold one model: initializers
named like the module's parameters are taken as they are, and a MatMul weight (which the ONNX
exporter renames) is found through the Add of its layer's bias and transposed back.
Needs torch==2.13.0, litert-torch and onnx: pip install torch==2.13.0 litert-torch onnx.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from train_digits_cnn import HERE, DigitsCNN
from train_digits_transformer import DigitsTransformer
from train_digits_vgg import DigitsVGG

REFERENCE = {"digits_cnn": DigitsCNN, "digits_transformer": DigitsTransformer, "digits_vgg": DigitsVGG}


def weights_from_onnx(path, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    graph = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    state = {name: inits[name] for name in module.state_dict() if name in inits}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in graph.node:  # x @ W.T + b exported as MatMul(x, W') then Add(., "<layer>.bias")
        if node.op_type == "MatMul" and node.input[1] in inits:
            for add in consumers.get(node.output[0], []):
                bias = next((n for n in add.input if n.endswith(".bias") and n in inits), None)
                if add.op_type == "Add" and bias is not None:
                    state[bias[:-len(".bias")] + ".weight"] = inits[node.input[1]].T
    missing = set(module.state_dict()) - set(state)
    if missing:
        raise SystemExit(f"{path.name}: no weights found for {sorted(missing)}")
    return {name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in state.items()}


def convert(name: str) -> None:
    import litert_torch
    from ai_edge_litert.interpreter import Interpreter

    model = REFERENCE[name]()
    model.load_state_dict(weights_from_onnx(HERE / f"{name}.onnx", model))
    model.eval()

    with np.load(HERE / "digits_heldout.npz") as data:
        x, y = data["x"], data["y"]
    out = HERE / f"{name}.tflite"
    litert_torch.convert(model, (torch.from_numpy(x[:1]),)).export(str(out))

    interpreter = Interpreter(model_path=str(out))
    interpreter.allocate_tensors()
    inp, outp = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    predictions = []
    for sample in x:
        interpreter.set_tensor(inp["index"], sample[None])
        interpreter.invoke()
        predictions.append(int(interpreter.get_tensor(outp["index"]).argmax()))
    accuracy = float((np.array(predictions) == y).mean())
    print(f"{out.name}: {out.stat().st_size} bytes, held-out accuracy {accuracy:.4f} on {len(y)} samples")
    meta = {
        "model": name.replace("_", "-"),
        "file": out.name,
        "source": f"{name}.onnx weights loaded into {REFERENCE[name].__module__}.{REFERENCE[name].__name__}",
        "converter": f"litert-torch {litert_torch.__version__ if hasattr(litert_torch, '__version__') else ''}".strip(),
        "torch": torch.__version__,
        "input": _tensor(inp),
        "output": _tensor(outp),
        "heldout_samples": int(len(y)),
        "heldout_accuracy": round(accuracy, 4),
    }
    (HERE / f"{name}_tflite.json").write_text(json.dumps(meta, indent=2) + "\n")


def _tensor(detail: dict) -> dict:
    return {"name": detail["name"], "shape": [int(d) for d in detail["shape"]], "dtype": detail["dtype"].__name__}


def main() -> None:
    names = sys.argv[1:] or ["digits_cnn"]
    unknown = [n for n in names if n not in REFERENCE]
    if unknown:
        raise SystemExit(f"unknown reference model {unknown[0]!r}; known: {', '.join(REFERENCE)}")
    for name in names:
        convert(name)


if __name__ == "__main__":
    main()
