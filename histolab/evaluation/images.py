"""Image sets to evaluate: a folder, a CSV, or the bundled data; loaded lazily, one batch at a time.

Specs (``--real`` / ``--fake`` / ``--train`` on the command line):

* ``DIR``: every image under DIR (recursively). Its class is the first-level
  subfolder (``fake/<class>/*.png``); images directly in DIR have no class.
* ``FILE.csv`` or ``FILE.csv@SPLIT``: rows ``path,label[,split]`` with a header;
  paths are relative to the CSV's folder; ``@SPLIT`` keeps one split.
* ``bundled:train|val|test``: the held-out protocol on the bundled crops:
  ``balanced(crops(SPLIT, stride=8), per_class=150, seed=0)``.

Every image is converted to 8-bit RGB the same documented way (``to_rgb8``)
before any feature extractor sees it.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from histolab.errors import DataError, InvalidRequest

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"}
# The bundled held-out protocol (see the module docstring); one place so that
# every report names the same numbers.
BUNDLED_STRIDE = 8
BUNDLED_PER_CLASS = 150
BUNDLED_SEED = 0
BACKGROUND = (255, 255, 255)  # transparent pixels become white: the colour of the glass around tissue


@dataclass(frozen=True)
class ImageRef:
    """One image of a set: how to load it, its class (or None) and a name for reports."""

    name: str
    label: str | None
    loader: Callable[[], Image.Image]


@dataclass
class ImageSet:
    spec: str
    items: list[ImageRef]

    def __len__(self) -> int:
        return len(self.items)

    @property
    def labels(self) -> list[str | None]:
        return [it.label for it in self.items]

    @property
    def classes(self) -> list[str]:
        return sorted({it.label for it in self.items if it.label is not None})

    def subset(self, indices) -> ImageSet:
        return ImageSet(self.spec, [self.items[i] for i in indices])

    def load(self, i: int) -> Image.Image:
        it = self.items[i]
        try:
            img = it.loader()
            img.load()
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
            raise DataError(f"cannot read image {it.name} of {self.spec}: {exc}; remove or replace the file") from exc
        return to_rgb8(img)

    def batches(self, batch_size: int) -> Iterator[tuple[list[int], list[Image.Image]]]:
        """(indices, RGB images) in order, ``batch_size`` at a time: never the whole set in memory."""
        for start in range(0, len(self.items), batch_size):
            idx = list(range(start, min(start + batch_size, len(self.items))))
            yield idx, [self.load(i) for i in idx]


def to_rgb8(img: Image.Image) -> Image.Image:
    """8-bit RGB, the one conversion every metric sees.

    * RGB: unchanged. Palette and other colour modes (CMYK, YCbCr, LAB, HSV): PIL's ``convert("RGB")``.
    * Transparency (RGBA, LA, PA, palette with a transparent index): composited on white.
    * Grayscale (1, L): the grey value in all three channels.
    * 16-bit grayscale (I;16*, I): scaled by 255 / 65535 and rounded (PIL's own
      ``convert`` would clip everything above 255 to white).
    * Float (F): values in [0, 1] are scaled by 255, others clipped to [0, 255].
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img, dtype=np.float64)
        arr = np.clip(np.rint(arr * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if np.nanmax(arr, initial=0.0) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.rint(np.nan_to_num(arr)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    return img.convert("RGB")


def _file_loader(path: Path) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        with Image.open(path) as im:
            im.load()
            return im.copy()

    return load


def open_image_set(spec: str | Path, *, max_images: int | None = None) -> ImageSet:
    """An ImageSet from a folder, a CSV (``@split`` optional) or ``bundled:<split>``."""
    text = str(spec)
    if text.startswith("bundled:"):
        items = _bundled(text.split(":", 1)[1])
    else:
        path_text, _, split = text.partition("@") if text.lower().split("@")[0].endswith(".csv") else (text, "", "")
        path = Path(path_text).expanduser()
        if not path.exists():
            raise DataError(f"{text}: no such folder or file")
        if path.is_dir():
            items = _folder(path)
        elif path.suffix.lower() == ".csv":
            items = _csv(path, split or None)
        else:
            raise InvalidRequest(f"{text}: expected a folder of images, a .csv index or bundled:<split>")
    if not items:
        raise DataError(f"{text}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    if max_images is not None and len(items) > max_images:
        # Evenly spaced rather than the first N, so classes in sorted folders all stay represented.
        keep = np.linspace(0, len(items) - 1, max_images).round().astype(int)
        items = [items[i] for i in keep]
    return ImageSet(text, items)


def _folder(root: Path) -> list[ImageRef]:
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not any(part.startswith(".") for part in p.parts)
    )
    out = []
    for p in files:
        rel = p.relative_to(root)
        label = rel.parts[0] if len(rel.parts) > 1 else None
        out.append(ImageRef(rel.as_posix(), label, _file_loader(p)))
    return out


def _csv(path: Path, split: str | None) -> list[ImageRef]:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read the CSV ({exc})") from exc
    if not rows or "path" not in rows[0] or "label" not in rows[0]:
        raise DataError(f"{path}: expected a header with columns path,label[,split]")
    out = []
    for n, row in enumerate(rows, start=2):
        if split is not None and (row.get("split") or "") != split:
            continue
        p = (path.parent / (row["path"] or "")).resolve()
        if not p.is_file():
            raise DataError(f"{path}, line {n}: image {row['path']!r} does not exist")
        out.append(ImageRef(row["path"], row["label"] or None, _file_loader(p)))
    if split is not None and not out:
        raise DataError(f"{path}: no rows with split {split!r}")
    return out


def _bundled(split: str) -> list[ImageRef]:
    from histolab.data import bundled

    if split not in bundled.SPLITS:
        raise InvalidRequest(f"bundled:{split}: the split must be one of {', '.join(bundled.SPLITS)}")
    chosen = bundled.balanced(
        bundled.crops(split, stride=BUNDLED_STRIDE), per_class=BUNDLED_PER_CLASS, seed=BUNDLED_SEED
    )
    return [ImageRef(c.name, c.label, lambda c=c: bundled.load_crop(c)) for c in chosen]


def images_from_pil(
    images: list[Image.Image], labels: list[str | None] | None = None, spec: str = "memory"
) -> ImageSet:
    """An ImageSet over images already in memory (per-epoch validation, sweeps)."""
    labels = labels if labels is not None else [None] * len(images)
    if len(labels) != len(images):
        raise InvalidRequest(f"{len(images)} images but {len(labels)} labels")
    return ImageSet(
        spec,
        [ImageRef(f"{i:06d}", lab, lambda im=im: im) for i, (im, lab) in enumerate(zip(images, labels, strict=True))],
    )
