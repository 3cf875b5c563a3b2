"""The embedded default encoder: a small CNN trained by histolab itself.

It exists so that reference-patch generation (and pathology-feature metrics)
work on a fresh machine with no hub access. Trained self-supervised (SimCLR
with neighbouring-region positives) on the training band of the bundled
tissue images by ``python -m histolab.encoders.train_embedded``; what it
captures and what it does not is written in that module and in
``checkpoints/embedded-encoder/manifest.json``.

Input: any RGB image, resized (shorter side) to 64 px and centre-cropped,
which is the bundled crops' and the embedded base model's scale. Output: the
network's global-average-pooled 256-d feature (non-negative, unnormalised;
compare with cosine similarity).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from histolab.config import PROJECT_ROOT
from histolab.encoders.embedded_net import INPUT_SIZE, MEAN, STD, EmbeddedNet
from histolab.encoders.frozen import FrozenEncoder, normalise, resize_center_crop
from histolab.errors import ModelNotFound
from histolab.files import expected_from_module, load_state_dict, sha256_file

EMBEDDED_ENCODER_DIR = PROJECT_ROOT / "checkpoints" / "embedded-encoder"
WEIGHTS_FILE = "model.safetensors"


class EmbeddedEncoder(FrozenEncoder):
    """64 px input (resize shorter side to 64, centre crop), 256-d pooled CNN features."""

    def __init__(self, net: EmbeddedNet, weights_hash: str, device: str | torch.device = "cpu"):
        self.name = "embedded"
        self.device = torch.device(device)
        self.model = net.float().eval().to(self.device)
        self.dim = net.dim
        self.weights_hash = weights_hash
        self.batch_size = 256  # a small network: large batches are cheap

    def _prepare(self, im: Image.Image) -> torch.Tensor:
        return normalise(resize_center_crop(im, INPUT_SIZE), MEAN, STD)


def state_for_saving(net: EmbeddedNet) -> dict[str, torch.Tensor]:
    """Floats as fp16 (half the size; the encoder computes in fp32), integers as they are."""
    return {k: (v.half() if v.is_floating_point() else v).contiguous().clone() for k, v in net.state_dict().items()}


def random_init_encoder(seed: int = 0) -> EmbeddedEncoder:
    """The same network with seeded random weights: the baseline a trained encoder must beat."""
    torch.manual_seed(seed)
    return EmbeddedEncoder(EmbeddedNet(), weights_hash=f"random-init-seed-{seed}")


def load_embedded_encoder(weights: str | Path | None = None, device: str | torch.device = "cpu") -> EmbeddedEncoder:
    path = Path(weights) if weights is not None else EMBEDDED_ENCODER_DIR / WEIGHTS_FILE
    if path.is_dir():
        path = path / WEIGHTS_FILE
    if not path.exists():
        raise ModelNotFound(
            f"the embedded encoder's weights are missing at {path}: rebuild them with "
            "`nice -n 5 python -m histolab.encoders.train_embedded` (a few CPU minutes)"
        )
    with torch.device("meta"):
        expected = expected_from_module(EmbeddedNet())
    tensors, _ = load_state_dict(path, expected=expected, strict=True)
    net = EmbeddedNet()
    net.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()}, strict=True)
    return EmbeddedEncoder(net, sha256_file(path), device)


def manifest(folder: Path = EMBEDDED_ENCODER_DIR) -> dict:
    p = folder / "manifest.json"
    return json.loads(p.read_text()) if p.exists() else {}
