"""The image-encoder protocol shared by reference-patch generation, the
foundation-embedding adapter and evaluation (pathology feature spaces)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class ImageEncoder(Protocol):
    """A frozen image encoder: PIL images in, one embedding per image out.

    ``name``: registry name ("uni2-h", "uni", "embedded", ...).
    ``dim``: embedding width (1536 for UNI2-h, 1024 for UNI).
    ``weights_hash``: sha256 of the weights, for recipes and caches.
    ``transform(images)``: the encoder's own preprocessing -> (n, 3, H, W) tensor.
    ``encode(images)``: (n, dim) float32 embeddings on the CPU, without gradients.
    """

    name: str
    dim: int
    weights_hash: str

    def transform(self, images: list) -> object: ...

    def encode(self, images: list) -> object: ...
