"""InceptionV3 as FID defines it: the 2015-12-05 TensorFlow graph, pool3 features (2048-d).

Differences from torchvision's InceptionV3 that FID depends on, all kept here:
batch norm without a scale (gamma = 1) and eps 1e-3 (TensorFlow's); average
pools that do not count padding; and in the last block (``mixed_10``) a max
pool where torchvision has an average pool (a quirk of the TF graph). Input:
(n, 3, 299, 299) float in [-1, 1), i.e. ``(x - 128) / 128`` of 8-bit pixels.

Module names follow the TF graph (``mixed_4/tower_1/conv_2``), which is also
how ``default_1.pt`` names them, so weights are mapped by name, and each
layer's stride and padding are checked against the file's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from histolab.errors import UnsafeFile

BN_EPS = 1e-3  # TensorFlow's batch-norm epsilon in the FID graph
FEATURE_DIM = 2048
NUM_CLASSES = 1008  # the 2015 graph's softmax: 1000 ImageNet classes + 8 unused


class ConvBN(nn.Module):
    """conv (no bias) -> batch norm (no scale, eps 1e-3) -> ReLU, as one TF 'conv' node."""

    def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=0):
        super().__init__()
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        self.stride = stride
        self.padding = (padding, padding) if isinstance(padding, int) else tuple(padding)
        # Buffers, not parameters: the network is frozen and never trained here.
        self.register_buffer("weight", torch.zeros(cout, cin, kh, kw))
        self.register_buffer("beta", torch.zeros(cout))
        self.register_buffer("mean", torch.zeros(cout))
        self.register_buffer("var", torch.ones(cout))

    def forward(self, x):
        x = F.conv2d(x, self.weight, None, self.stride, self.padding)
        x = F.batch_norm(x, self.mean, self.var, None, self.beta, False, 0.0, BN_EPS)
        return F.relu(x)


def _avg3(x):
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


class BlockA(nn.Module):  # mixed, mixed_1, mixed_2 (35 x 35)
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.conv = ConvBN(cin, 64, 1)
        self.tower = nn.ModuleDict({"conv": ConvBN(cin, 48, 1), "conv_1": ConvBN(48, 64, 5, padding=2)})
        self.tower_1 = nn.ModuleDict(
            {"conv": ConvBN(cin, 64, 1), "conv_1": ConvBN(64, 96, 3, padding=1), "conv_2": ConvBN(96, 96, 3, padding=1)}
        )
        self.tower_2 = nn.ModuleDict({"conv": ConvBN(cin, pool_features, 1)})

    def forward(self, x):
        t = self.tower
        t1 = self.tower_1
        return torch.cat(
            [
                self.conv(x),
                t.conv_1(t.conv(x)),
                t1.conv_2(t1.conv_1(t1.conv(x))),
                self.tower_2.conv(_avg3(x)),
            ],
            1,
        )


class BlockB(nn.Module):  # mixed_3: 35 -> 17
    def __init__(self, cin: int):
        super().__init__()
        self.conv = ConvBN(cin, 384, 3, stride=2)
        self.tower = nn.ModuleDict(
            {"conv": ConvBN(cin, 64, 1), "conv_1": ConvBN(64, 96, 3, padding=1), "conv_2": ConvBN(96, 96, 3, stride=2)}
        )

    def forward(self, x):
        t = self.tower
        return torch.cat([self.conv(x), t.conv_2(t.conv_1(t.conv(x))), F.max_pool2d(x, 3, 2)], 1)


class BlockC(nn.Module):  # mixed_4 .. mixed_7 (17 x 17), factorised 7 x 7
    def __init__(self, cin: int, c7: int):
        super().__init__()
        row, col = {"kernel": (1, 7), "padding": (0, 3)}, {"kernel": (7, 1), "padding": (3, 0)}
        self.conv = ConvBN(cin, 192, 1)
        self.tower = nn.ModuleDict(
            {"conv": ConvBN(cin, c7, 1), "conv_1": ConvBN(c7, c7, **row), "conv_2": ConvBN(c7, 192, **col)}
        )
        self.tower_1 = nn.ModuleDict(
            {
                "conv": ConvBN(cin, c7, 1),
                "conv_1": ConvBN(c7, c7, **col),
                "conv_2": ConvBN(c7, c7, **row),
                "conv_3": ConvBN(c7, c7, **col),
                "conv_4": ConvBN(c7, 192, **row),
            }
        )
        self.tower_2 = nn.ModuleDict({"conv": ConvBN(cin, 192, 1)})

    def forward(self, x):
        t, t1 = self.tower, self.tower_1
        b1 = t.conv_2(t.conv_1(t.conv(x)))
        b2 = t1.conv_4(t1.conv_3(t1.conv_2(t1.conv_1(t1.conv(x)))))
        return torch.cat([self.conv(x), b1, b2, self.tower_2.conv(_avg3(x))], 1)


class BlockD(nn.Module):  # mixed_8: 17 -> 8
    def __init__(self, cin: int):
        super().__init__()
        self.tower = nn.ModuleDict({"conv": ConvBN(cin, 192, 1), "conv_1": ConvBN(192, 320, 3, stride=2)})
        self.tower_1 = nn.ModuleDict(
            {
                "conv": ConvBN(cin, 192, 1),
                "conv_1": ConvBN(192, 192, (1, 7), padding=(0, 3)),
                "conv_2": ConvBN(192, 192, (7, 1), padding=(3, 0)),
                "conv_3": ConvBN(192, 192, 3, stride=2),
            }
        )

    def forward(self, x):
        t, t1 = self.tower, self.tower_1
        return torch.cat([t.conv_1(t.conv(x)), t1.conv_3(t1.conv_2(t1.conv_1(t1.conv(x)))), F.max_pool2d(x, 3, 2)], 1)


class BlockE(nn.Module):  # mixed_9, mixed_10 (8 x 8)
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool  # True in mixed_10: the TF graph's max pool (torchvision: average)
        self.conv = ConvBN(cin, 320, 1)
        self.tower_conv = ConvBN(cin, 384, 1)
        self.tower_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_1_conv = ConvBN(cin, 448, 1)
        self.tower_1_conv_1 = ConvBN(448, 384, 3, padding=1)
        self.tower_1_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_1_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_2_conv = ConvBN(cin, 192, 1)

    def forward(self, x):
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        pooled = F.max_pool2d(x, 3, 1, 1) if self.max_pool else _avg3(x)
        return torch.cat(
            [
                self.conv(x),
                self.tower_mixed_conv(a),
                self.tower_mixed_conv_1(a),
                self.tower_1_mixed_conv(b),
                self.tower_1_mixed_conv_1(b),
                self.tower_2_conv(pooled),
            ],
            1,
        )


class FIDInceptionV3(nn.Module):
    """(n, 3, 299, 299) in [-1, 1) -> (n, 2048) pool3 features; optional 1008-class logits head."""

    def __init__(self):
        super().__init__()
        self.conv = ConvBN(3, 32, 3, stride=2)
        self.conv_1 = ConvBN(32, 32, 3)
        self.conv_2 = ConvBN(32, 64, 3, padding=1)
        self.conv_3 = ConvBN(64, 80, 1)
        self.conv_4 = ConvBN(80, 192, 3)
        self.mixed = BlockA(192, 32)
        self.mixed_1 = BlockA(256, 64)
        self.mixed_2 = BlockA(288, 64)
        self.mixed_3 = BlockB(288)
        self.mixed_4 = BlockC(768, 128)
        self.mixed_5 = BlockC(768, 160)
        self.mixed_6 = BlockC(768, 160)
        self.mixed_7 = BlockC(768, 192)
        self.mixed_8 = BlockD(768)
        self.mixed_9 = BlockE(1280, max_pool=False)
        self.mixed_10 = BlockE(2048, max_pool=True)
        # The softmax weights (2048 x 1008) are not in default_1.pt; they are
        # set by ``load_logits_head`` when the user supplies a file with them.
        self.logits_weight: torch.Tensor | None = None

    def forward(self, x):
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2:] != (299, 299):
            raise ValueError(f"expected (n, 3, 299, 299) input, got {tuple(x.shape)}")
        x = self.conv_2(self.conv_1(self.conv(x)))
        x = F.max_pool2d(x, 3, 2)
        x = self.conv_4(self.conv_3(x))
        x = F.max_pool2d(x, 3, 2)
        for name in ("mixed", "mixed_1", "mixed_2", "mixed_3", "mixed_4", "mixed_5", "mixed_6", "mixed_7"):
            x = getattr(self, name)(x)
        x = self.mixed_10(self.mixed_9(self.mixed_8(x)))
        return F.avg_pool2d(x, 8).flatten(1)  # pool3: 8 x 8 -> 1

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """1008-class logits from pool3 features, without the bias, as the original IS code computes them."""
        if self.logits_weight is None:
            raise RuntimeError("no logits head loaded (see load_logits_head)")
        return features.double() @ self.logits_weight.double().T


def conv_layers(model: nn.Module) -> list[tuple[str, ConvBN]]:
    """Every ConvBN in registration order (the order the TF graph and default_1.pt list them)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ConvBN)]


def load_logits_head(model: FIDInceptionV3, path) -> None:
    """Attach the 1008-class softmax weights for the Inception Score.

    ``path``: a state dict holding ``fc.weight`` (1008 x 2048), e.g. torch-fidelity's
    ``weights-inception-2015-12-05-6726825d.pth`` or pytorch-fid's
    ``pt_inception-2015-12-05-6726825d.pth``. It is read weights-only, and its
    first convolution must equal ours: a head is only used with the trunk it was
    trained with.
    """
    from histolab.files import load_state_dict

    tensors, _ = load_state_dict(path)
    w = tensors.get("fc.weight")
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != (NUM_CLASSES, FEATURE_DIM):
        raise UnsafeFile(f"{path}: no fc.weight of shape ({NUM_CLASSES}, {FEATURE_DIM}) (the Inception softmax layer)")
    first = tensors.get("Conv2d_1a_3x3.conv.weight")
    if not isinstance(first, torch.Tensor) or first.shape != model.conv.weight.shape:
        raise UnsafeFile(f"{path}: no Conv2d_1a_3x3.conv.weight to check that the head belongs to the FID network")
    if not torch.allclose(first.float(), model.conv.weight, rtol=1e-5, atol=1e-6):
        raise UnsafeFile(f"{path}: its convolutions differ from the FID network's: this head belongs to another model")
    model.logits_weight = w.detach().float().contiguous()
