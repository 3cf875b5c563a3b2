"""Uploads, checked by content: the file's magic bytes, its size, its dimensions.

Gradio hands a handler the path of the uploaded file (``type="filepath"``,
never decoded by Gradio first). Nothing here trusts the file name or the
browser's content type: a PNG is a PNG because its first bytes say so and
Pillow decodes it fully within the limits.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from histolab.errors import InvalidRequest

# Magic bytes of the formats accepted (what a microscope export or a screenshot gives).
MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
)
MIN_SIDE = 8  # pixels; anything smaller cannot be a tissue patch


def sniff(head: bytes) -> str | None:
    for magic, fmt in MAGIC:
        if head.startswith(magic):
            return fmt
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def read_upload(path: str | Path | None, *, max_bytes: int, what: str = "the upload") -> bytes:
    if path is None or str(path) == "":
        raise InvalidRequest(f"{what} is empty: choose a file first")
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError:
        raise InvalidRequest(f"{what} could not be read; upload it again") from None
    if size > max_bytes:
        raise InvalidRequest(f"{what} is {size / 2**20:.1f} MB; the limit here is {max_bytes / 2**20:.0f} MB")
    if size == 0:
        raise InvalidRequest(f"{what} is an empty file")
    return p.read_bytes()


def open_image(
    data: bytes,
    *,
    max_side: int,
    what: str = "the upload",
    formats: tuple[str, ...] = ("PNG", "JPEG", "TIFF", "BMP", "WEBP"),
) -> Image.Image:
    """The decoded image (RGB), or InvalidRequest saying what is wrong with it."""
    fmt = sniff(data[:16])
    if fmt is None or fmt not in formats:
        raise InvalidRequest(f"{what} is not a {'/'.join(formats)} image (judged by its content, not its name)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format != fmt:
                raise InvalidRequest(f"{what} starts like a {fmt} but decodes as {im.format}")
            w, h = im.size
            # Checked before decoding: a small file can declare a huge image (a decompression bomb).
            if max(w, h) > max_side or min(w, h) < MIN_SIDE:
                raise InvalidRequest(f"{what} is {w}x{h} pixels; sides must be from {MIN_SIDE} to {max_side} pixels")
            frames = getattr(im, "n_frames", 1)
            if frames > 1:
                raise InvalidRequest(f"{what} has {frames} frames or pages; upload a single image")
            im.load()
            return _to_rgb(im)
    except InvalidRequest:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidRequest(f"{what} is damaged or not a readable image ({type(exc).__name__})") from None


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im.copy()
    from histolab.evaluation.images import to_rgb8

    return to_rgb8(im)


def image_upload(path, *, max_bytes: int, max_side: int, what: str = "the image") -> Image.Image:
    return open_image(read_upload(path, max_bytes=max_bytes, what=what), max_side=max_side, what=what)


def png_upload(path, *, max_bytes: int, max_side: int, what: str = "the PNG") -> bytes:
    """A PNG's bytes (checked to decode), kept as uploaded so its text chunks (the recipe) survive."""
    data = read_upload(path, max_bytes=max_bytes, what=what)
    open_image(data, max_side=max_side, what=what, formats=("PNG",))
    return data
