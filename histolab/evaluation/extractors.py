"""Feature extractors, kept apart from the metrics: images in, one vector per image out.

* ``inception``: the FID network (pool3, 2048-d). Every image is resized to
  299 x 299 with PIL's bicubic filter, channel by channel in float32 so that
  nothing is rounded back to 8 bits, then scaled by ``(x - 128) / 128``: the
  resize clean-fid argues for (antialiased, the same in every library), applied
  to every input size, 64 px crops included.
* any pathology encoder of ``histolab.encoders`` (``uni2-h``, ``uni``,
  ``embedded``): its own preprocessing, through the ImageEncoder protocol.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

from histolab.errors import InvalidRequest, ModelNotFound

INCEPTION = "inception"
INCEPTION_SIZE = 299
# Aliases accepted on the command line for the encoder registry's names.
ENCODER_ALIASES = {"uni2h": "uni2-h", "uni2-h": "uni2-h", "uni": "uni", "embedded": "embedded"}


@runtime_checkable
class FeatureExtractor(Protocol):
    name: str  # the feature space's name in reports
    dim: int
    weights_hash: str

    def features(self, images: list[Image.Image]) -> np.ndarray: ...  # (n, dim) float32


def resize_for_inception(img: Image.Image) -> np.ndarray:
    """(299, 299, 3) float32 in [0, 255]: PIL bicubic per channel on float data (clean-fid's resize)."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32)
    if arr.shape[:2] == (INCEPTION_SIZE, INCEPTION_SIZE):
        return arr
    out = np.empty((INCEPTION_SIZE, INCEPTION_SIZE, 3), dtype=np.float32)
    for c in range(3):
        ch = Image.fromarray(arr[:, :, c], mode="F").resize((INCEPTION_SIZE, INCEPTION_SIZE), Image.BICUBIC)
        out[:, :, c] = np.asarray(ch)
    # Bicubic overshoots at sharp edges; clip to the pixel range as clean-fid does.
    return np.clip(out, 0.0, 255.0)


class InceptionExtractor:
    """The FID InceptionV3 (weights from default_1.pt) with the one resize path above."""

    name = INCEPTION
    dim = 2048

    def __init__(self, device: str = "cpu", logits_head: str | None = None, model=None):
        import torch

        from histolab.evaluation.inception_net import load_logits_head
        from histolab.evaluation.inception_weights import DEFAULT_1_SHA256, build_fid_inception

        self.device = torch.device(device)
        self.model = (model or build_fid_inception()).to(self.device)
        self.weights_hash = DEFAULT_1_SHA256
        if logits_head is not None:
            load_logits_head(self.model, logits_head)

    @property
    def has_logits(self) -> bool:
        return self.model.logits_weight is not None

    def preprocess(self, images: list[Image.Image]):
        import torch

        x = np.stack([resize_for_inception(im) for im in images]).transpose(0, 3, 1, 2)
        return (torch.from_numpy(np.ascontiguousarray(x)) - 128.0) / 128.0

    def features(self, images: list[Image.Image]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            f = self.model(self.preprocess(images).to(self.device))
        return f.float().cpu().numpy()

    def logits(self, features: np.ndarray) -> np.ndarray:
        import torch

        return self.model.logits(torch.from_numpy(np.asarray(features, dtype=np.float32))).numpy()


class EncoderExtractor:
    """Any ImageEncoder (histolab.encoders.base) as a feature space."""

    def __init__(self, encoder):
        from histolab.encoders.base import ImageEncoder

        if not isinstance(encoder, ImageEncoder):
            raise InvalidRequest(f"{encoder!r} does not implement the ImageEncoder protocol (name, dim, encode)")
        self.encoder = encoder
        self.name = str(encoder.name)
        self.dim = int(encoder.dim)
        self.weights_hash = str(getattr(encoder, "weights_hash", ""))

    def features(self, images: list[Image.Image]) -> np.ndarray:
        out = self.encoder.encode(images)
        arr = out.detach().cpu().float().numpy() if hasattr(out, "detach") else np.asarray(out, dtype=np.float32)
        if arr.shape != (len(images), self.dim):
            raise InvalidRequest(
                f"encoder {self.name} returned shape {arr.shape}, expected ({len(images)}, {self.dim})"
            )
        return arr.astype(np.float32, copy=False)


def parse_feature_names(text: str) -> list[str]:
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    if not names:
        raise InvalidRequest("--features is empty: give e.g. inception,uni2h")
    if len(set(names)) != len(names):
        raise InvalidRequest(f"--features lists a space twice: {text!r}")
    return names


def get_extractor(name: str, *, device: str = "cpu", logits_head: str | None = None, paths=None) -> FeatureExtractor:
    """``inception`` or a name of the encoder registry (uni2h / uni2-h, uni, embedded, ...)."""
    key = name.strip().lower()
    if key == INCEPTION:
        return InceptionExtractor(device=device, logits_head=logits_head)
    try:
        from histolab.encoders import get_encoder
    except ImportError as exc:
        raise ModelNotFound(
            f"feature space {name!r} needs the pathology encoder registry (histolab.encoders.get_encoder), "
            "which this installation lacks; use --features inception"
        ) from exc
    return EncoderExtractor(get_encoder(ENCODER_ALIASES.get(key, key), paths=paths, device=device))
