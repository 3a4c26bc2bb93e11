"""Train the reference model: a small CNN on scikit-learn's bundled 8x8 digits.

Writes, next to this script:
  digits_cnn.onnx        the fp32 model (input "image" [N,1,8,8] float32 in 0..1,
                         output "logits" [N,10])
  digits_heldout.npz     the held-out split (x, y) the accuracy guard evaluates on
  digits_calib.npz       200 training inputs (x) to calibrate static quantization on
  digits_train.npz       the training split (x, y): what distillation and pruning recovery train on
  digits_cnn.json        how it was made and the accuracy it reached

Needs the `models` extra (torch, scikit-learn): pip install -e '.[models]'.
Deterministic: same seed, same split, same weights on the same torch build.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

HERE = pathlib.Path(__file__).resolve().parent
SEED = 0
BATCH = 64
EPOCHS = 40
CALIB_SAMPLES = 200


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    return train_test_split(x, y, test_size=0.2, random_state=SEED, stratify=y)


def write_calibration_set(x_train: np.ndarray) -> None:
    """digits_calib.npz: CALIB_SAMPLES training inputs (no labels) for static quantization, so that
    calibration never sees the held-out set the accuracy guard evaluates on."""
    pick = np.random.default_rng(SEED).choice(len(x_train), CALIB_SAMPLES, replace=False)
    np.savez_compressed(HERE / "digits_calib.npz", x=x_train[np.sort(pick)])


def main() -> None:
    torch.manual_seed(SEED)
    x_train, x_test, y_train, y_test = load_split()
    model = DigitsCNN()
    fit(model, torch.optim.Adam(model.parameters(), lr=3e-3), x_train, y_train, EPOCHS)
    export_reference(model, "digits-cnn", EPOCHS, x_test, y_test, with_parameters=False)
    np.savez_compressed(HERE / "digits_heldout.npz", x=x_test, y=y_test)
    np.savez_compressed(HERE / "digits_train.npz", x=x_train, y=y_train)
    write_calibration_set(x_train)


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, x: np.ndarray, y: np.ndarray, epochs: int, *,
        label_smoothing: float = 0.0, schedule=None, batch: int = BATCH) -> None:
    """Cross-entropy in shuffled mini-batches, the order drawn from SEED (a run is reproducible);
    *schedule* steps after every batch."""
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    generator = torch.Generator().manual_seed(SEED)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(xt), generator=generator)
        for start in range(0, len(xt), batch):
            idx = order[start:start + batch]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx], label_smoothing=label_smoothing).backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()


def export_reference(model: nn.Module, name: str, epochs: int, x_test: np.ndarray, y_test: np.ndarray, *,
                     with_parameters: bool = True, **extra) -> None:
    """Measure a trained reference model on the held-out split, export it as <name>.onnx (input
    "image" [N,1,8,8], output "logits" [N,10], dynamic batch) and write <name>.json."""
    model.eval()
    with torch.no_grad():
        accuracy = float((model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())
    params = sum(p.numel() for p in model.parameters())
    print(f"held-out accuracy: {accuracy:.4f} on {len(y_test)} samples; {params} parameters")
    onnx_path = HERE / f"{name.replace('-', '_')}.onnx"
    torch.onnx.export(model, (torch.from_numpy(x_test[:1]),), str(onnx_path), input_names=["image"],
                      output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=17, dynamo=False)
    write_meta(name, onnx_path, epochs, len(y_test), accuracy, **extra,
               **({"parameters": params} if with_parameters else {}))


def write_meta(model: str, onnx_path: pathlib.Path, epochs: int, heldout: int, accuracy: float, **extra) -> None:
    """<model file stem>.json: how a reference model was made and the held-out accuracy it reached."""
    meta = {
        "model": model,
        "file": onnx_path.name,
        **extra,
        "dataset": "sklearn.datasets.load_digits, 80/20 stratified split, random_state=0",
        "input": {"name": "image", "shape": ["batch", 1, 8, 8], "dtype": "float32", "range": [0, 1]},
        "output": {"name": "logits", "shape": ["batch", 10], "dtype": "float32"},
        "epochs": epochs,
        "heldout_samples": int(heldout),
        "heldout_accuracy": round(accuracy, 4),
        "torch": torch.__version__,
    }
    onnx_path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    main()
