"""The bundled labelled dataset: 64 px crops of three real tissue images.

Splits are drawn from disjoint regions of each source image: every image is cut
into three horizontal bands (train on top, then validation, then test at the
bottom) and every crop lies wholly inside one band, so no held-out crop shares
a single pixel with a training crop. Within a band, crops are taken on a grid
(``stride``) and kept when enough of them is tissue rather than glass.
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from histolab.data.sources import PHOTO_SOURCES, TISSUE_SOURCES

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
CROP = 64  # the embedded model's resolution
SPLITS = ("train", "val", "test")
# Fractions of each image's height; each band is at least MIN_BAND rows so
# that even the 500-512 px images give held-out crops.
BAND_FRACTIONS = {"val": 0.15, "test": 0.20}
MIN_BAND = 80
TISSUE_MIN_FRACTION = 0.5


@dataclass(frozen=True)
class Crop:
    label: str
    file: str
    x: int
    y: int
    split: str
    size: int = CROP

    @property
    def name(self) -> str:
        return f"{self.label}_{self.split}_x{self.x}_y{self.y}.png"


@functools.cache
def source_array(file: str) -> np.ndarray:
    """The bundled image as an RGB uint8 array (cached: the files are small)."""
    with Image.open(BUNDLED_DIR / file) as im:
        return np.asarray(im.convert("RGB"))


def bands(height: int) -> dict[str, tuple[int, int]]:
    """Row ranges [start, stop) of the train, val and test bands."""
    test = max(MIN_BAND, round(height * BAND_FRACTIONS["test"]))
    val = max(MIN_BAND, round(height * BAND_FRACTIONS["val"]))
    if height - test - val < 2 * CROP:
        raise ValueError(f"image of height {height} is too small for three bands")
    return {
        "train": (0, height - test - val),
        "val": (height - test - val, height - test),
        "test": (height - test, height),
    }


def _glass(p: np.ndarray) -> np.ndarray:
    """Pixels of bright, unsaturated glass background (what tissue_fraction does not count)."""
    p = p.astype(np.int16)
    return (p.mean(axis=2) > 215) & ((p.max(axis=2) - p.min(axis=2)) < 25)


def tissue_fraction(patch: np.ndarray) -> float:
    """Share of pixels that are not bright, unsaturated glass background."""
    return float(1.0 - _glass(patch).mean())


@functools.cache
def _glass_integral(file: str) -> np.ndarray:
    """Summed-area table of the glass mask of a source image, padded with a zero row and column."""
    g = _glass(source_array(file)).astype(np.int64)
    return np.pad(g.cumsum(0).cumsum(1), ((1, 0), (1, 0)))


def _window_tissue_fraction(file: str, y: int, x: int, size: int) -> float:
    """tissue_fraction of the size x size window at (x, y) of a source, from its summed-area table.

    The glass count is exact (integers), and the fraction is formed as tissue_fraction forms it, so the
    kept crops are the same; it costs four lookups instead of a pass over the window, which matters
    because the grid is scanned by every loader, test and training run.
    """
    s = _glass_integral(file)
    count = s[y + size, x + size] - s[y, x + size] - s[y + size, x] + s[y, x]
    return float(1.0 - count / (size * size))


def crops(split: str | None = None, stride: int = 16, labels: tuple[str, ...] | None = None) -> list[Crop]:
    """Every crop of the bundled dataset on a grid, in a fixed order (a new list: callers may change it)."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return list(_crops(split, stride, None if labels is None else tuple(labels)))


@functools.cache
def _crops(split: str | None, stride: int, labels: tuple[str, ...] | None) -> tuple[Crop, ...]:
    out: list[Crop] = []
    for src in TISSUE_SOURCES:
        if labels is not None and src.label not in labels:
            continue
        h, w = source_array(src.file).shape[:2]
        for name, (r0, r1) in bands(h).items():
            if split is not None and name != split:
                continue
            for y in range(r0, r1 - CROP + 1, stride):
                for x in range(0, w - CROP + 1, stride):
                    if _window_tissue_fraction(src.file, y, x, CROP) >= TISSUE_MIN_FRACTION:
                        out.append(Crop(src.label, src.file, x, y, name))
    return tuple(out)


def load_crop(crop: Crop) -> Image.Image:
    arr = source_array(crop.file)
    return Image.fromarray(arr[crop.y : crop.y + crop.size, crop.x : crop.x + crop.size].copy())


def labels() -> list[str]:
    return [s.label for s in TISSUE_SOURCES]


def balanced(crop_list: list[Crop], per_class: int, seed: int = 0) -> list[Crop]:
    """At most ``per_class`` crops of each class, picked with a fixed seed."""
    rng = np.random.default_rng(seed)
    out: list[Crop] = []
    for lab in sorted({c.label for c in crop_list}):
        these = [c for c in crop_list if c.label == lab]
        idx = sorted(rng.choice(len(these), size=min(per_class, len(these)), replace=False))
        out.extend(these[i] for i in idx)
    return out


def materialize(out_dir: str | Path, split: str | None = None, stride: int = 16, per_class: int | None = None) -> Path:
    """Write crops as PNGs in class subfolders plus ``index.csv`` (path,label,split).

    The folder is then a dataset in both of the user formats histolab reads
    (class subfolders, or the CSV).
    """
    out_dir = Path(out_dir)
    chosen = crops(split, stride)
    if per_class is not None:
        chosen = balanced(chosen, per_class)
    rows = []
    for c in chosen:
        rel = Path(c.split) / c.label / c.name if split is None else Path(c.label) / c.name
        dest = out_dir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        load_crop(c).save(dest)
        rows.append((rel.as_posix(), c.label, c.split))
    with open(out_dir / "index.csv", "w", newline="") as fh:
        wr = csv.writer(fh)
        wr.writerow(["path", "label", "split"])
        wr.writerows(rows)
    return out_dir


def photos() -> list[tuple[str, Image.Image]]:
    """The non-tissue photographs of the base model's training mix, with captions."""
    out = []
    for ph in PHOTO_SOURCES:
        with Image.open(BUNDLED_DIR / "photos" / f"{ph.name}.png") as im:
            out.append((ph.caption, im.convert("RGB")))
    return out
