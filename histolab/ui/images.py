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


def _font():
    return ImageFont.load_default()


def _fit(text: str, width: int, draw: ImageDraw.ImageDraw, font) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def grid(
    rows: list[list[Image.Image | None]],
    row_labels: list[str],
    col_labels: list[str],
    *,
    title: str = "",
) -> Image.Image:
    """An X/Y grid: one cell per image, labels on the left and on top (SD-webui's X/Y plot layout)."""
    if not rows or not rows[0]:
        raise ValueError("an empty grid")
    cells = [im for r in rows for im in r if im is not None]
    side = max([CELL_MIN, *(max(im.size) for im in cells)])
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    top = HEADER_H * (2 if title else 1)
    canvas = Image.new("RGB", (LABEL_W + n_cols * side, top + n_rows * side), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font()
    if title:
        draw.text((6, 6), _fit(title, canvas.width - 12, draw, font), fill="black", font=font)
    for j, lab in enumerate(col_labels):
        draw.text(
            (LABEL_W + j * side + 4, top - HEADER_H + 8), _fit(lab, side - 8, draw, font), fill="black", font=font
        )
    for i, (row, lab) in enumerate(zip(rows, row_labels, strict=True)):
        y = top + i * side
        draw.text((4, y + side // 2 - 6), _fit(lab, LABEL_W - 8, draw, font), fill="black", font=font)
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
