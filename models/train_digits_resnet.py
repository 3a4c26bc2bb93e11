"""Train the fourth reference model: a small ResNet, the shape of most real vision backbones.

Residual blocks with BatchNorm (folded into the convolutions when exported): a 3x3 stem of 32
channels on the digits upsampled to 16x16 inside the model, two basic blocks at 32 channels, a
strided block to 64 channels with a 1x1 projection on its shortcut, one more block at 64,
global average pooling and a linear classifier. Structured pruning has to treat each stage's
residual stream as one group (the stem, or the projection, and every block's last convolution
write into it), so this model is where that is measured.

Writes, next to this script:
  digits_resnet.onnx   the fp32 model (input "image" [N,1,8,8] float32 in 0..1, output "logits" [N,10]);
                       same data files as digits_cnn (digits_heldout / digits_calib / digits_train.npz)
  digits_resnet.json   how it was made and the accuracy it reached

Needs the `models` extra (torch, scikit-learn): pip install -e '.[models]'.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from train_digits_cnn import SEED, export_reference, fit, load_split

EPOCHS = 30


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else \
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.shortcut(x) + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class DigitsResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.layers = nn.Sequential(BasicBlock(32, 32), BasicBlock(32, 32), BasicBlock(32, 64, 2), BasicBlock(64, 64))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(image, scale_factor=2.0, mode="nearest")
        return self.head(self.layers(self.stem(x)))


def main() -> None:
    torch.manual_seed(SEED)
    x_train, x_test, y_train, y_test = load_split()
    model = DigitsResNet()
    fit(model, torch.optim.Adam(model.parameters(), lr=1e-3), x_train, y_train, EPOCHS)
    export_reference(model, "digits-resnet", EPOCHS, x_test, y_test,
                     architecture="nearest 2x upsample to 16x16, stem conv 32, basic blocks 32-32-64(stride 2, "
                                  "1x1 projection)-64 with BatchNorm, global average pool, fc 64-10")


if __name__ == "__main__":
    main()
