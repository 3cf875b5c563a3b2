"""What every histolab encoder shares: image conversion, batched no-grad encoding."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from histolab.errors import InvalidRequest


def to_pil(image) -> Image.Image:
    """A PIL image, an (h, w, 3) uint8 array or a (3, h, w) float tensor in [0, 1] -> RGB PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise InvalidRequest(f"an image tensor must be (3, h, w) in [0, 1], got shape {tuple(image.shape)}")
        image = (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        if image.ndim != 3 or image.shape[2] not in (1, 3, 4) or image.dtype != np.uint8:
            raise InvalidRequest(f"an image array must be (h, w, 3) uint8, got {image.shape} {image.dtype}")
        return Image.fromarray(image[..., :3] if image.shape[2] != 1 else np.repeat(image, 3, axis=2)).convert("RGB")
    raise InvalidRequest(f"cannot encode a {type(image).__name__}: give PIL images, uint8 arrays or tensors")


def resize_center_crop(im: Image.Image, size: int, resample: int = Image.Resampling.BILINEAR) -> Image.Image:
    """torchvision's Resize(size) (shorter side, antialiased) then CenterCrop(size), with PIL."""
    w, h = im.size
    if min(w, h) != size:
        if w <= h:
            nw, nh = size, int(size * h / w)
        else:
            nw, nh = int(size * w / h), size
        im = im.resize((nw, nh), resample)
    w, h = im.size
    left, top = round((w - size) / 2.0), round((h - size) / 2.0)
    return im.crop((left, top, left + size, top + size))


def normalise(im: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


class FrozenEncoder:
    """Base of the encoders: subclasses set name, dim, weights_hash, model,
    device, and implement ``_prepare(PIL image) -> (3, H, W) tensor``."""

    name: str
    dim: int
    weights_hash: str
    model: torch.nn.Module
    device: torch.device
    batch_size: int = 32  # images per forward pass: bounds peak memory on a CPU

    def _prepare(self, im: Image.Image) -> torch.Tensor:
        raise NotImplementedError

    def transform(self, images) -> torch.Tensor:
        """The encoder's own preprocessing: images -> (n, 3, H, W) float32 tensor."""
        if isinstance(images, (Image.Image, np.ndarray)) or (isinstance(images, torch.Tensor) and images.ndim == 3):
            images = [images]
        if len(images) == 0:
            raise InvalidRequest("no images to encode")
        return torch.stack([self._prepare(to_pil(im)) for im in images])

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    @torch.no_grad()
    def encode(self, images) -> torch.Tensor:
        """(n, dim) float32 embeddings on the CPU, without gradients, in batches."""
        if isinstance(images, (Image.Image, np.ndarray)) or (isinstance(images, torch.Tensor) and images.ndim == 3):
            images = [images]
        images = list(images)
        if not images:
            raise InvalidRequest("no images to encode")
        out = []
        for i in range(0, len(images), self.batch_size):
            x = self.transform(images[i : i + self.batch_size]).to(self.device)
            out.append(self._forward(x).float().cpu())
        emb = torch.cat(out)
        if emb.shape[1] != self.dim:
            raise RuntimeError(f"{self.name}: produced {emb.shape[1]}-d embeddings, {self.dim} declared")
        return emb

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} dim={self.dim} weights={self.weights_hash[:10]} on {self.device}>"
