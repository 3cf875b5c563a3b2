"""Reading users' image files: what a file is (by content), and turning it into 8-bit RGB.

Tiles come from many tools: 16-bit TIFF/PNG exports of scanners, RGBA PNGs
from slide viewers, grayscale IHC channels, palette images. The models take
8-bit RGB, so every file is inspected once (header only, plus an integrity
check) and converted the same way every time it is read.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Larger than this (in pixels) is a whole-slide image or a mistake, not a tile:
# 1e8 is Pillow's own default bomb threshold order of magnitude (89.5 M), kept
# explicit so that the message can say what to do.
MAX_PIXELS = 100_000_000
# Transparent pixels are composited onto white, the colour of the glass
# background in a brightfield slide, rather than on black.
BACKGROUND = (255, 255, 255)
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_MODE_NAMES = {
    "1": "black and white",
    "L": "grayscale",
    "LA": "grayscale with alpha",
    "P": "palette",
    "PA": "palette with alpha",
    **dict.fromkeys(_SIXTEEN_BIT_MODES, "grayscale"),
}


class NotUsable(Exception):
    """The file cannot be used as an image; ``str(exc)`` says why."""


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    mode: str  # Pillow's mode as opened, e.g. "RGB", "RGBA", "L", "I;16"
    bits: int  # bits per channel in the file: 8 or 16
    format: str  # the format Pillow recognised from the content, e.g. "PNG"
    alpha: bool = False  # has transparency (an alpha channel or a transparent palette entry)

    @property
    def conversion(self) -> str | None:
        """How the image is turned into 8-bit RGB, or None when it already is."""
        if self.mode == "RGB" and self.bits == 8:
            return None
        name = _MODE_NAMES.get(self.mode, self.mode)
        name = name if name == self.mode else f"{name} ({self.mode})"
        depth = "16-bit " if self.bits == 16 else ""
        alpha = ", transparency composited on white" if self.alpha else ""
        return f"{depth}{name} -> 8-bit RGB{alpha}"


def _rawmode(im: Image.Image) -> str:
    tile = getattr(im, "tile", None) or []
    if not tile:
        return ""
    args = tile[0][3] if not hasattr(tile[0], "args") else tile[0].args
    if isinstance(args, tuple):
        args = args[0] if args and isinstance(args[0], str) else ""
    return args if isinstance(args, str) else ""


def inspect(path: str | Path) -> ImageInfo:
    """Header facts of an image file, decided by its content. Raises NotUsable."""
    p = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise NotUsable(f"{w}x{h} pixels: a whole-slide image, not a tile (cut it into tiles first)")
                mode, fmt = im.mode, im.format or "unknown"
                bits = 16 if mode in _SIXTEEN_BIT_MODES or ";16" in _rawmode(im) else 8
                alpha = mode in _ALPHA_MODES or (mode == "P" and "transparency" in im.info)
                im.verify()  # checks the file's integrity (e.g. PNG CRCs) without decoding it
    except NotUsable:
        raise
    except UnidentifiedImageError:
        raise NotUsable("not an image (content not recognised as any image format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise NotUsable(f"too large: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise NotUsable(f"corrupt or truncated image ({exc})") from None
    if mode == "F":
        raise NotUsable("32-bit floating-point image: export it as 8-bit or 16-bit RGB first")
    return ImageInfo(w, h, mode, bits, fmt, alpha)


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB: 16-bit scaled (not clipped), transparency composited on white."""
    if im.mode == "RGB":
        return im  # Pillow already reduced 16-bit RGB to its high byte on load
    if im.mode in _SIXTEEN_BIT_MODES:
        a = np.asarray(im).astype(np.uint32)
        # Pillow's own convert() clips 16-bit values at 255; scale the range instead.
        a8 = (np.clip(a, 0, 65535) >> 8).astype(np.uint8) if im.mode != "I" or a.max() > 255 else a.astype(np.uint8)
        return Image.fromarray(a8, mode="L").convert("RGB")
    if im.mode in _ALPHA_MODES or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")


def read_rgb(path: str | Path) -> Image.Image:
    """The file as an 8-bit RGB image, fully decoded (the file is closed on return)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            im.load()
            return to_rgb(im).copy()


def fit(im: Image.Image, size: int) -> Image.Image:
    """Centre-crop to a square and resize to ``size`` (no stretching of tissue)."""
    if im.size == (size, size):
        return im
    return ImageOps.fit(im, (size, size), method=Image.Resampling.BICUBIC)
