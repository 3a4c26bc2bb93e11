"""Train the second reference model: a small vision transformer on the same 8x8 digits.

Not a CNN: the image is cut into 16 patches of 2x2 pixels, embedded, and run through two
pre-norm transformer encoder blocks (4-head self-attention, GELU MLP) whose weights are
MatMuls, so int4 weight-only quantization, dynamic int8 and attention all get exercised.

Writes, next to this script:
  digits_transformer.onnx   the fp32 model (input "image" [N,1,8,8] float32 in 0..1,
                            output "logits" [N,10]), same split and held-out set as the CNN
  digits_transformer.json   how it was made and the accuracy it reached

Needs the `models` extra (torch, scikit-learn): pip install -e '.[models]'. Deterministic on
the same torch build.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from train_digits_cnn import BATCH, SEED, export_reference, fit, load_split

EPOCHS = 120
DIM, HEADS, DEPTH, MLP = 64, 4, 2, 128
PATCH = 2


class Attention(nn.Module):
    """Written out with Linear layers and matmuls, so the exported graph is plain MatMul/Softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.out = nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        weights = F.softmax(q @ k.transpose(-1, -2) / math.sqrt(DIM // HEADS), dim=-1)
        return self.out((weights @ v).transpose(1, 2).reshape(n, t, DIM))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(DIM), Attention()
        self.norm2 = nn.LayerNorm(DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, MLP), nn.GELU(), nn.Linear(MLP, DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DigitsTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        patches = (8 // PATCH) ** 2
        self.embed = nn.Linear(PATCH * PATCH, DIM)
        self.position = nn.Parameter(torch.zeros(1, patches, DIM))
        self.blocks = nn.Sequential(*[Block() for _ in range(DEPTH)])
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        n = image.shape[0]
        side = 8 // PATCH
        patches = image.reshape(n, side, PATCH, side, PATCH).permute(0, 1, 3, 2, 4).reshape(n, side * side, -1)
        x = self.blocks(self.embed(patches) + self.position)
        return self.head(self.norm(x).mean(dim=1))


def main() -> None:
    torch.manual_seed(SEED)
    x_train, x_test, y_train, y_test = load_split()
    model = DigitsTransformer()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    steps = EPOCHS * math.ceil(len(x_train) / BATCH)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    fit(model, optimizer, x_train, y_train, EPOCHS, label_smoothing=0.1, schedule=schedule)
    export_reference(model, "digits-transformer", EPOCHS, x_test, y_test,
                     architecture=f"ViT: {(8 // PATCH) ** 2} patches of {PATCH}x{PATCH}, dim {DIM}, {DEPTH} blocks, "
                                  f"{HEADS} heads, MLP {MLP}, mean pooling")


if __name__ == "__main__":
    main()
