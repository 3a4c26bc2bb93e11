"""Convert the reference model to TensorFlow Lite with Google's PyPI converter (litert-torch).

Writes, next to this script:
  digits_cnn.tflite        the same fp32 weights as digits_cnn.onnx, as a LiteRT flatbuffer
                           (input [1,1,8,8] float32, output [1,10] float32)
  digits_cnn_tflite.json   how it was made and the held-out accuracy LiteRT reaches with it

The weights are read from digits_cnn.onnx (not retrained), so both files hold one model.
Needs torch==2.13.0, litert-torch and onnx: pip install torch==2.13.0 litert-torch onnx.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from train_digits_cnn import HERE, DigitsCNN


def main() -> None:
    import litert_torch
    from ai_edge_litert.interpreter import Interpreter

    model = DigitsCNN()
    weights = {init.name: torch.from_numpy(numpy_helper.to_array(init).copy())
               for init in onnx.load(str(HERE / "digits_cnn.onnx")).graph.initializer}
    missing = set(model.state_dict()) - set(weights)
    if missing:
        raise SystemExit(f"digits_cnn.onnx lacks weights {sorted(missing)}")
    model.load_state_dict({k: weights[k] for k in model.state_dict()})
    model.eval()

    with np.load(HERE / "digits_heldout.npz") as data:
        x, y = data["x"], data["y"]
    out = HERE / "digits_cnn.tflite"
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
        "model": "digits-cnn",
        "file": out.name,
        "source": "digits_cnn.onnx weights loaded into train_digits_cnn.DigitsCNN",
        "converter": f"litert-torch {litert_torch.__version__ if hasattr(litert_torch, '__version__') else ''}".strip(),
        "torch": torch.__version__,
        "input": {"name": inp["name"], "shape": [int(d) for d in inp["shape"]], "dtype": str(inp["dtype"].__name__)},
        "output": {"name": outp["name"], "shape": [int(d) for d in outp["shape"]], "dtype": str(outp["dtype"].__name__)},
        "heldout_samples": int(len(y)),
        "heldout_accuracy": round(accuracy, 4),
    }
    (HERE / "digits_cnn_tflite.json").write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    main()
