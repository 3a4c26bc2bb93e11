"""Train the third reference model: a VGG-style CNN big enough that its latency is compute.

The 8x8 digits are upsampled to 32x32 inside the model (a Resize op), then five 3x3
convolutions (32-32-64-64-128 channels, three max-pools) and two fully connected layers: about
400k parameters and ~25M multiply-adds per image, so a single inference takes on the order of a
millisecond on a CPU core instead of the reference CNN's 15 µs of mostly call overhead. Plain
conv chains with no residual connections, so structured channel pruning applies throughout.

Writes, next to this script:
  digits_vgg.onnx    the fp32 model (input "image" [N,1,8,8] float32 in 0..1, output "logits" [N,10]);
                     same data files as digits_cnn (digits_heldout / digits_calib / digits_train.npz)
  digits_vgg.json    how it was made and the accuracy it reached

Needs the `models` extra (torch, scikit-learn): pip install -e '.[models]'.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from train_digits_cnn import SEED, export_reference, fit, load_split

EPOCHS = 25


class DigitsVGG(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        block = lambda cin, cout: [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU()]  # noqa: E731
        self.features = nn.Sequential(
            *block(1, 32), *block(32, 32), nn.MaxPool2d(2),
            *block(32, 64), *block(64, 64), nn.MaxPool2d(2),
            *block(64, 128), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(128 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(image, scale_factor=4.0, mode="nearest")
        return self.classifier(self.features(x))


def main() -> None:
    torch.manual_seed(SEED)
    x_train, x_test, y_train, y_test = load_split()
    model = DigitsVGG()
    fit(model, torch.optim.Adam(model.parameters(), lr=1e-3), x_train, y_train, EPOCHS)
    export_reference(model, "digits-vgg", EPOCHS, x_test, y_test,
                     architecture="nearest 4x upsample to 32x32, conv 32-32-pool-64-64-pool-128-pool, fc 2048-128-10")


if __name__ == "__main__":
    main()
