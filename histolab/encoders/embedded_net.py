"""The embedded default encoder's network: a small CNN for 64 px tissue crops.

Why this shape: a 5x5 stride-2 stem and four stages of two 3x3 convolutions
(32, 64, 128, 256 channels at 32, 32 -> 16, 8, 4 px) see a receptive field of
about 90 px, so the last stage sees the whole crop: enough for nuclear size and
density, the glandular and stromal arrangement at this magnification, and
stain colour. 1.17 M parameters: a SimCLR run of a few hundred steps fits in a
few CPU minutes, and the weights stored as fp16 take 2.3 MB.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

WIDTHS = (32, 64, 128, 256)
INPUT_SIZE = 64  # the bundled crops' and the embedded base model's resolution
EMBED_DIM = WIDTHS[-1]
# Per-channel mean and standard deviation of the bundled training crops (RGB in
# [0, 1], every 16 px of the training bands: 0.623/0.466/0.555 and
# 0.213/0.246/0.217), rounded. Fixed constants rather than per-checkpoint
# values so that the transform never depends on the weights file.
MEAN = (0.62, 0.47, 0.55)
STD = (0.21, 0.25, 0.22)


def _cbr(cin: int, cout: int, stride: int = 1, kernel: int = 3) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


class EmbeddedNet(nn.Module):
    """(n, 3, 64, 64) normalised RGB -> (n, 256) global-average-pooled features."""

    def __init__(self, widths: tuple[int, ...] = WIDTHS):
        super().__init__()
        layers = _cbr(3, widths[0], 2, 5) + _cbr(widths[0], widths[0])
        for cin, cout in itertools.pairwise(widths):
            layers += _cbr(cin, cout, 2) + _cbr(cout, cout)
        self.features = nn.Sequential(*layers)
        self.dim = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))


class ProjectionHead(nn.Module):
    """SimCLR's MLP head; used only in training (the loss sees its output, the
    encoder hands out the features before it, which transfer better)."""

    def __init__(self, dim: int = EMBED_DIM, hidden: int = 512, out: int = 128):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
