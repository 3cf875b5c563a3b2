"""What keeps a rater blind: opaque ids, clean images, anonymous model labels.

- Ids that reach a rater are HMAC-SHA256 values under a per-study secret of
  (purpose, rater, unit or item): different for every rater, unguessable, and
  impossible to link to an item without the secret. The seed (which fixes the
  orders and samples, and may be published with a paper) is not the secret.
- Every served image is decoded, colour-managed to sRGB, centre-cropped to a
  square, resampled to the study's fixed size and written as a fresh 8-bit RGB
  PNG from raw pixels: the file holds IHDR, IDAT and IEND only (no recipe
  text, no ICC profile, no pHYs, no time, no original name).
- Models are shown (in set studies) as "Model A", "Model B", ... in a seeded
  order that does not follow the config's order.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import random
import string
import struct
import zlib

import numpy as np
from PIL import Image, ImageCms, ImageOps

from histolab.errors import StudyError

ID_HEX = 32  # 128 bits of HMAC: unguessable, short enough for a URL
ALLOWED_CHUNKS = ("IHDR", "IDAT", "IEND")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A fixed zlib level: the same pixels always give the same bytes, whatever the source's encoder did.
PNG_COMPRESS_LEVEL = 6


def opaque_id(secret: str, purpose: str, rater_id: str, thing: int | str) -> str:
    msg = f"{purpose}\x1f{rater_id}\x1f{thing}".encode()
    return hmac.new(bytes.fromhex(secret), msg, hashlib.sha256).hexdigest()[:ID_HEX]


def is_opaque_id(value: object) -> bool:
    return isinstance(value, str) and len(value) == ID_HEX and all(c in string.hexdigits[:16] for c in value)


def to_srgb(im: Image.Image) -> Image.Image:
    """8-bit RGB in sRGB: the embedded ICC profile applied (then dropped), alpha flattened on white."""
    icc = im.info.get("icc_profile")
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: scale to 8 bits rather than clip.
        im = Image.fromarray((np.asarray(im, dtype=np.int64).clip(0, 65535) >> 8).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, rgba)
    if icc:
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            im = ImageCms.profileToProfile(im.convert("RGB"), src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError) as exc:
            raise StudyError(f"the image's embedded colour profile cannot be applied: {exc}") from exc
    return im.convert("RGB")


def served_png(im: Image.Image, size: int) -> bytes:
    """The image as raters receive it: square, ``size`` px, sRGB, a PNG with no metadata at all."""
    im = ImageOps.exif_transpose(im)  # the orientation a viewer would show, then EXIF goes
    rgb = to_srgb(im)
    side = min(rgb.size)
    left, top = (rgb.width - side) // 2, (rgb.height - side) // 2
    rgb = rgb.crop((left, top, left + side, top + side))
    if side != size:
        rgb = rgb.resize((size, size), Image.Resampling.LANCZOS)
    # Rebuilt from raw bytes: nothing of the source's info dict can follow.
    clean = Image.frombytes("RGB", (size, size), rgb.tobytes())
    buf = io.BytesIO()
    clean.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False)
    data = buf.getvalue()
    check_clean_png(data)
    return data


def png_chunks(data: bytes) -> list[str]:
    """The chunk types of a PNG, in order (CRCs checked)."""
    if not data.startswith(PNG_SIGNATURE):
        raise StudyError("not a PNG")
    out, pos = [], len(PNG_SIGNATURE)
    while pos < len(data):
        if pos + 8 > len(data):
            raise StudyError("truncated PNG chunk header")
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        ctype = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        if zlib.crc32(ctype + body) != crc:
            raise StudyError(f"PNG chunk {ctype!r} has a bad CRC")
        out.append(ctype.decode("latin-1"))
        pos += 12 + length
    return out


def check_clean_png(data: bytes) -> None:
    chunks = png_chunks(data)
    extra = [c for c in chunks if c not in ALLOWED_CHUNKS]
    if extra or chunks[0] != "IHDR" or chunks[-1] != "IEND":
        raise StudyError(f"a served image must hold only {ALLOWED_CHUNKS} chunks, found {chunks}")


def model_labels(source_names: list[str], seed: int, prefix: str = "Model") -> dict[str, str]:
    """Source -> "Model A", "Model B", ... in a seeded order independent of the config's order."""
    names = sorted(source_names)
    random.Random(f"{seed}|labels").shuffle(names)
    return {name: f"{prefix} {_letters(i)}" for i, name in enumerate(names)}


def _letters(i: int) -> str:
    s = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        s = string.ascii_uppercase[r] + s
    return s


def rater_pseudonyms(rater_ids: list[str]) -> dict[str, str]:
    """Rater -> "R1", "R2", ... for blinded exports (in the order raters were added)."""
    return {r: f"R{i + 1}" for i, r in enumerate(rater_ids)}


def shown_text_leaks(texts: dict[str, set[str | None]], kinds: dict[str, str], mode: str) -> list[str]:
    """Problems where the prompt text shown with an image would tell its source apart.

    ``texts`` maps each rated source to the texts its images are shown with
    (None: no text). A text must occur in a real and a generated source when
    the study has both; in an item study (where no model label is shown) it
    must also occur in at least two sources, so it never singles out a model.
    """
    problems = []
    by_text: dict[str | None, set[str]] = {}
    for src, ts in texts.items():
        for t in ts:
            by_text.setdefault(t, set()).add(src)
    has_both = {"real", "generated"} <= set(kinds.values())
    for t, srcs in sorted(by_text.items(), key=lambda kv: (kv[0] is None, kv[0] or "")):
        shown = "no prompt" if t is None else f"prompt {t!r}"
        src_kinds = {kinds[s] for s in srcs}
        if has_both and len(src_kinds) < 2:
            problems.append(f"{shown} is shown only with {next(iter(src_kinds))} images (sources {sorted(srcs)})")
        elif mode == "item" and len(texts) >= 2 and len(srcs) < 2:
            problems.append(f"{shown} is shown only with images of source {next(iter(srcs))!r}")
    return problems
