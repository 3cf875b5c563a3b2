"""Images from a checkpoint while training: fixed-seed samples per epoch, validation images, class images.

A second, frozen copy of the base model is loaded (lazily) for this, and each
epoch's adapter folder is applied to it through histolab.adapters exactly as
a user's generation would: the samples show what the saved files do, not what
the in-training modules do. A private adapter runtime keeps these loads out
of the process-wide cache.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw


class EpochSampler:
    def __init__(self, base_source: str, *, device, dtype=None, encoder=None, paths=None):
        from histolab.adapters.runtime import AdapterRuntime, RuntimeConfig

        self.base_source = base_source
        self.device = device
        self.dtype = dtype
        self.paths = paths
        # Small: one epoch's adapter at a time (a DreamBooth U-Net of SD 1.5 is 1.7 GB in fp16).
        self.runtime = AdapterRuntime(RuntimeConfig(max_cache_bytes=1), paths=paths)
        if encoder is not None:
            self.runtime.register_encoder(encoder, device=str(device))
        self._model = None

    def model(self):
        if self._model is None:
            from histolab.pipeline import load_base

            self._model = load_base(self.base_source, device=str(self.device), dtype=self.dtype, paths=self.paths)
        return self._model

    def generate(self, adapter: Path | None, requests: list, seeds: list[int] | None = None) -> list[Image.Image]:
        from histolab.generation import AdapterSpec, generate

        model = self.model()
        specs = [AdapterSpec(str(adapter))] if adapter is not None else []
        images = []
        with self.runtime.applied(model, specs):
            for req in requests:
                images += [g.image for g in generate(model, req, seeds=seeds)]
        self.runtime.clear()
        return images

    def close(self) -> None:
        self._model = None
        self.runtime.clear()


def grid(
    images: list[Image.Image],
    labels: list[str],
    references: list[Image.Image | None] | None = None,
    cols: int | None = None,
) -> Image.Image:
    """One row per class (label written at its start); a reference patch, if any, left of each sample."""
    rows: dict[str, list[Image.Image]] = {}
    for i, (im, lab) in enumerate(zip(images, labels, strict=True)):
        ref = references[i] if references else None
        tile = im if ref is None else _pair(ref.convert("RGB").resize(im.size), im)
        rows.setdefault(lab, []).append(tile)
    if not rows:
        return Image.new("RGB", (8, 8), "white")
    w, h = next(iter(rows.values()))[0].size
    ncol = cols or max(len(r) for r in rows.values())
    label_w = 96
    out = Image.new("RGB", (label_w + ncol * w, len(rows) * h), "white")
    draw = ImageDraw.Draw(out)
    for r, (lab, tiles) in enumerate(rows.items()):
        draw.text((4, r * h + 4), lab[:14], fill=(0, 0, 0))
        for c, t in enumerate(tiles[:ncol]):
            out.paste(t, (label_w + c * w, r * h))
    return out


def _pair(ref: Image.Image, im: Image.Image) -> Image.Image:
    out = Image.new("RGB", (im.width * 2 + 2, im.height), "white")
    out.paste(ref, (0, 0))
    out.paste(im, (im.width + 2, 0))
    return out
