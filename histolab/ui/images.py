"""Pictures the pages show: labelled grids (Compare, X/Y plots), PNGs that carry recipes,
and the review's images as inline data (no URL, no file name)."""

from __future__ import annotations

import base64
import html
import shutil
import tempfile
import zipfile
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from histolab.recipe import JSON_KEY, PARAMETERS_KEY, Recipe, png_bytes

CELL_MIN = 128  # grid cells are upscaled to at least this many pixels (the embedded model makes 64 px patches)
LABEL_W = 150
HEADER_H = 28


def with_recipe(image: Image.Image, recipe: Recipe) -> Image.Image:
    """The image with its recipe in ``info``: Gradio writes these as PNG text chunks when it saves the file."""
    image.info[PARAMETERS_KEY] = recipe.to_parameters()
    image.info[JSON_KEY] = recipe.to_json()
    return image


def _font(size: int = 12):
    return ImageFont.load_default(size=size)


def _wrap(text: str, width: int, draw: ImageDraw.ImageDraw, font) -> list[str]:
    """``text`` as lines of at most ``width`` pixels: broken at spaces, a word longer than a line broken
    inside it. Nothing is cut: a grid label is how a reader tells its rows and columns apart."""
    lines: list[str] = []
    for word in str(text).split() or [""]:
        line = f"{lines[-1]} {word}" if lines and lines[-1] else word
        if lines and draw.textlength(line, font=font) <= width:
            lines[-1] = line
            continue
        while draw.textlength(word, font=font) > width and len(word) > 1:
            k = len(word)
            while k > 1 and draw.textlength(word[:k], font=font) > width:
                k -= 1
            lines.append(word[:k])
            word = word[k:]
        lines.append(word)
    return lines


def _label_lines(labels: list[str], width: int, max_lines: int, draw) -> tuple[list[list[str]], object, int]:
    """Every label wrapped to ``width``, in the largest font (12 px down to 8 px) where none needs more than
    ``max_lines`` lines; at 8 px they take the lines they need. Returns (lines per label, font, line height)."""
    for size in (12, 11, 10, 9, 8):
        font = _font(size)
        wrapped = [_wrap(lab, width, draw, font) for lab in labels]
        if max((len(w) for w in wrapped), default=1) <= max_lines or size == 8:
            return wrapped, font, size + 3


def grid(
    rows: list[list[Image.Image | None]],
    row_labels: list[str],
    col_labels: list[str],
    *,
    title: str = "",
) -> Image.Image:
    """An X/Y grid: one cell per image, labels on the left and on top (SD-webui's X/Y plot layout).

    Labels are wrapped, never cut, and shrink to fit: row labels within their cell's height, column
    labels within four lines (the header grows for more); a one-line label keeps the plain layout."""
    if not rows or not rows[0]:
        raise ValueError("an empty grid")
    cells = [im for r in rows for im in r if im is not None]
    side = max([CELL_MIN, *(max(im.size) for im in cells)])
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = LABEL_W + n_cols * side
    col_lines, col_font, col_lh = _label_lines(col_labels, side - 8, 4, draw)
    row_lines, row_font, row_lh = _label_lines(row_labels, LABEL_W - 8, max(1, (side - 8) // 15), draw)
    title_lines, title_font, title_lh = _label_lines([title], width - 12, 2, draw) if title else ([[]], None, 0)
    col_h = max(HEADER_H, 12 + col_lh * max((len(w) for w in col_lines), default=1))
    title_h = max(HEADER_H, 12 + title_lh * len(title_lines[0])) if title else 0
    top = title_h + col_h
    canvas = Image.new("RGB", (width, top + n_rows * side), "white")
    draw = ImageDraw.Draw(canvas)
    for k, line in enumerate(title_lines[0]):
        draw.text((6, 6 + k * title_lh), line, fill="black", font=title_font)
    for j, lines in enumerate(col_lines):
        y0 = top - 6 - col_lh * len(lines)  # bottom-aligned, just above its column
        for k, line in enumerate(lines):
            draw.text((LABEL_W + j * side + 4, y0 + k * col_lh), line, fill="black", font=col_font)
    for i, (row, lines) in enumerate(zip(rows, row_lines, strict=True)):
        y = top + i * side
        y0 = y + (side - row_lh * len(lines)) // 2
        for k, line in enumerate(lines):
            draw.text((4, y0 + k * row_lh), line, fill="black", font=row_font)
        for j, im in enumerate(row):
            x = LABEL_W + j * side
            if im is None:
                draw.rectangle([x + 2, y + 2, x + side - 3, y + side - 3], outline="#bbb")
                continue
            cell = im.convert("RGB").resize((side, side), Image.Resampling.NEAREST)
            canvas.paste(cell, (x, y))
    return canvas


def png_data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def blinded_images_html(pngs: list[bytes], *, caption: str, size_px: int = 384) -> str:
    """``<img>`` tags with the PNGs inline. The alt text and caption are neutral ("Image 2 of 10")."""
    if not pngs:
        return ""
    tags = []
    for i, png in enumerate(pngs, 1):
        alt = f"{caption} {i} of {len(pngs)}" if len(pngs) > 1 else caption
        tags.append(
            f'<figure style="margin:4px;display:inline-block"><img src="{png_data_url(png)}" alt="{html.escape(alt)}" '
            f'style="width:{size_px}px;max-width:100%;image-rendering:auto;border:1px solid #ccc"/>'
            f'<figcaption style="text-align:center;font-size:12px">{html.escape(alt)}</figcaption></figure>'
        )
    return '<div style="display:flex;flex-wrap:wrap;gap:6px">' + "".join(tags) + "</div>"


def scratch_dir(prefix: str = "histolab-") -> Path:
    """A fresh folder in the system temp dir: what a download is copied to before Gradio serves it
    (the data dir may be elsewhere, e.g. /data, and must never be served itself)."""
    return Path(tempfile.mkdtemp(prefix=prefix))


def zip_pngs(named: list[tuple[str, bytes]], name: str) -> str:
    out = scratch_dir() / name
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as zf:  # PNGs are compressed already
        for fname, data in named:
            zf.writestr(fname, data)
    return str(out)


def zip_files(files: list[Path], name: str, root: Path | None = None) -> str:
    out = scratch_dir() / name
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for f in files:
            zf.write(f, f.relative_to(root).as_posix() if root else f.name)
    return str(out)


def copy_for_download(path: Path) -> str:
    dest = scratch_dir() / path.name
    shutil.copyfile(path, dest)
    return str(dest)


def recipe_png(image: Image.Image, recipe: Recipe) -> bytes:
    return png_bytes(image, recipe)
