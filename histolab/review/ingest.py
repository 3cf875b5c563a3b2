"""Reading a source folder: which files are images, their hashes, classes and recipes.

An item's keys (both stored, both accepted wherever an item is named):

- ``sha256``: of the original file's bytes, the hash ``sha256sum`` prints and
  ``histolab.files.sha256_file`` computes: the *content hash* that per-item
  metrics files use.
- ``pixel_sha256``: of the decoded pixels, as ``pixel_sha256()`` defines; the
  same image saved twice (other metadata, other compression) has one pixel
  hash, so duplicates are found across sources whatever their container.

Files are recognised by their first bytes, never by their extension; other
files (CSV, JSON, notes) in a source folder are listed as ignored.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from histolab.errors import HistolabError, StudyError
from histolab.recipe import Recipe, read_recipe
from histolab.review.config import SourceConfig

RECIPES_FILE = "recipes.jsonl"
# Larger images are refused: a pathology tile is at most a few thousand pixels
# a side; anything above is a whole slide or a decompression bomb.
MAX_PIXELS = 64_000_000

_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
)


def sniff_image(head: bytes) -> str | None:
    for sig, fmt in _SIGNATURES:
        if head.startswith(sig):
            return fmt
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def pixel_sha256(im: Image.Image) -> str:
    """sha256 of ``b"<width>x<height>\\n"`` followed by the 8-bit RGB pixels, row by row."""
    rgb = im.convert("RGB")
    h = hashlib.sha256(f"{rgb.width}x{rgb.height}\n".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class ScannedImage:
    source: str
    path: Path
    rel: str  # path inside the source folder (owner-only: it may name the class or model)
    cls: str | None
    recipe: Recipe | None
    sha256: str
    pixel_sha256: str
    format: str
    width: int
    height: int


@dataclass
class SourceScan:
    source: SourceConfig
    images: list[ScannedImage] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # files that are not images
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (file, same pixels as this earlier file)
    unsampled: int = 0  # images left out by `limit`


def _visible(p: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in p.relative_to(root).parts)


def _files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and _visible(p, folder))


def _has_image(folder: Path) -> bool:
    for p in _files_under(folder):
        with open(p, "rb") as fh:
            if sniff_image(fh.read(16)):
                return True
    return False


def _class_dirs(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and _has_image(d))


def _load_jsonl(src: SourceConfig) -> dict[str, Recipe]:
    path = src.path / RECIPES_FILE
    if not path.is_file():
        return {}
    out: dict[str, Recipe] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"source {src.name!r}: {RECIPES_FILE} line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise StudyError(f"{where} is not JSON: {exc}") from exc
        if not isinstance(obj, dict):
            raise StudyError(f"{where} must be a JSON object with 'file' and 'recipe'")
        key = next((k for k in ("file", "path", "image", "filename") if k in obj), None)
        if key is None:
            raise StudyError(f"{where} names no image ('file' key)")
        rel = str(obj[key])
        recipe = obj.get("recipe", {k: v for k, v in obj.items() if k != key})
        try:
            out[Path(rel).as_posix()] = Recipe.from_dict(recipe)
        except (HistolabError, TypeError) as exc:
            raise StudyError(f"{where}: the recipe cannot be read: {exc}") from exc
        if not (src.path / rel).is_file():
            raise StudyError(f"{where}: image {src.path / rel} does not exist")
    return out


def _open(path: Path, data: bytes, where: str) -> Image.Image:
    try:
        im = Image.open(io.BytesIO(data))
        if im.width * im.height > MAX_PIXELS:
            raise StudyError(f"{where}: {path} is {im.width}x{im.height}, above the {MAX_PIXELS} pixel limit")
        im.load()
    except StudyError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise StudyError(f"{where}: {path} cannot be decoded as an image: {exc}") from exc
    return im


def scan_source(src: SourceConfig, prompts: dict[str, str], seed: int) -> SourceScan:
    """Every image of a source with its hashes, class and recipe; errors name the file."""
    where = f"source {src.name!r}"
    scan = SourceScan(src)
    jsonl = _load_jsonl(src) if src.kind == "generated" else {}
    by_text = {text: cls for cls, text in prompts.items()}

    mode = src.classes
    class_dirs: list[Path] = []
    if mode in ("auto", "subfolders"):
        class_dirs = _class_dirs(src.path)
        if mode == "subfolders" and not class_dirs:
            raise StudyError(f"{where}: classes: subfolders, but {src.path} has no subfolder with images")
        if mode == "auto":
            mode = "subfolders" if class_dirs else ("prompt" if src.kind == "generated" else "none")

    explicit = src.images is not None
    candidates = [src.path / rel for rel in src.images] if src.images is not None else _files_under(src.path)

    seen: dict[str, str] = {}
    by_class: dict[str | None, list[ScannedImage]] = {}
    for path in candidates:
        rel = path.relative_to(src.path).as_posix()
        data = path.read_bytes()
        fmt = sniff_image(data[:16])
        if fmt is None:
            if explicit:
                raise StudyError(f"{where}: {path} is not an image (its first bytes are no image format we read)")
            scan.ignored.append(rel)
            continue
        cls: str | None
        if src.class_name is not None:
            cls = src.class_name
        elif mode == "subfolders":
            parts = Path(rel).parts
            if len(parts) < 2 or not any(d.name == parts[0] for d in class_dirs):
                raise StudyError(f"{where}: {path} lies outside the class subfolders; move it into one")
            cls = parts[0]
        else:
            cls = None
        im = _open(path, data, where)
        recipe = None
        if src.kind == "generated":
            if fmt == "PNG":
                try:
                    recipe = read_recipe(data)
                except HistolabError:
                    recipe = None
            recipe = recipe or jsonl.get(rel)
            if recipe is None:
                raise StudyError(
                    f"{where}: generated image {path} carries no recipe (no PNG recipe chunk, "
                    f"no line in {RECIPES_FILE}); was it written by histolab's generator?"
                )
            if mode == "prompt" and src.class_name is None:
                cls = by_text.get(recipe.prompt, recipe.prompt)
        psha = pixel_sha256(im)
        if psha in seen:
            scan.duplicates.append((rel, seen[psha]))
            continue
        seen[psha] = rel
        img = ScannedImage(
            source=src.name,
            path=path,
            rel=rel,
            cls=cls,
            recipe=recipe,
            sha256=hashlib.sha256(data).hexdigest(),
            pixel_sha256=psha,
            format=fmt,
            width=im.width,
            height=im.height,
        )
        by_class.setdefault(cls, []).append(img)

    if not by_class:
        raise StudyError(f"{where}: no images found in {src.path}")
    for cls in sorted(by_class, key=lambda c: (c is None, c or "")):
        imgs = by_class[cls]
        if src.limit is not None and len(imgs) > src.limit:
            rng = random.Random(f"{seed}|limit|{src.name}|{cls}")
            keep = sorted(rng.sample(range(len(imgs)), src.limit))
            scan.unsampled += len(imgs) - src.limit
            imgs = [imgs[i] for i in keep]
        scan.images.extend(imgs)
    return scan
