"""Users' tile datasets in the three formats histolab reads, checked before training.

* **Class folders** (torchvision ImageFolder style): ``root/<class>/**/<image>``,
  or with splits, ``root/<split>/<class>/**/<image>`` (split: train/val/test).
* **Chaoyang-style JSON**: ``[{"name": "train/539_2.jpg", "label": 0}, ...]``,
  paths relative to the JSON file's folder; integer labels get names through
  ``label_names`` (e.g. ``CHAOYANG_LABEL_NAMES``); ``train.json``/``test.json``
  give their split from the file name.
* **CSV**: a header with ``path,label`` and optionally ``split`` and ``group``
  (patient or slide id: see histolab.data.splits), paths relative to the CSV.

Each image may carry its own caption (e.g. its report's impression) for
training with per-image prompts: a CSV ``caption`` column (or ``text``,
``prompt``, ``impression``), a JSON ``caption`` (or ``text``/``prompt``) key,
or in class folders a ``.txt`` file of the same name beside the image
(kohya-ss's layout).

Every file is judged by its content, not its extension. Bad data never passes
silently: missing files, files that are not images, images smaller than the
training size and duplicate rows are skipped and listed in a ``LoadReport``
(or refused with ``strict=True``); grayscale, palette, RGBA and 16-bit images
are converted to 8-bit RGB and listed too; a class left with no usable image
is an error that names the class.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from histolab.data.images import ImageInfo, NotUsable, fit, inspect, read_rgb
from histolab.data.splits import SPLIT_ALIASES, check_no_leakage, normalize_split, stratified_split
from histolab.errors import DataError, InvalidRequest

# Chaoyang's four classes in its label order (dataset README: normal, serrated,
# adenocarcinoma, adenoma); check against the copy you have.
CHAOYANG_LABEL_NAMES = {0: "normal", 1: "serrated", 2: "adenocarcinoma", 3: "adenoma"}
# Column names accepted for the group (patient/slide) column of a CSV.
GROUP_COLUMNS = ("group", "patient", "patient_id", "slide", "slide_id", "case", "case_id")
SMALL_POLICIES = ("skip", "error")
# Column (CSV) or key (JSON) names accepted for an image's own caption, first found wins.
CAPTION_COLUMNS = ("caption", "text", "prompt", "impression")


@dataclass(frozen=True)
class Record:
    """One tile: where it is, its class, and optionally its split and group (patient/slide)."""

    path: Path
    label: str
    split: str | None = None
    group: str | None = None
    caption: str | None = None  # the image's own text, where the dataset gives one


@dataclass
class LoadReport:
    """What loading found: counts and, for every skipped or converted file, which and why."""

    source: str
    format: str
    listed: int = 0  # files or rows the dataset names
    classes: dict[str, int] = field(default_factory=dict)  # usable images per class
    splits: dict[str, int] = field(default_factory=dict)  # usable images per split ("none" if unsplit)
    missing: list[str] = field(default_factory=list)
    not_images: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    too_small: list[tuple[str, str]] = field(default_factory=list)  # (path, "WxH")
    duplicates: list[str] = field(default_factory=list)
    converted: list[tuple[str, str]] = field(default_factory=list)  # (path, conversion)
    notes: list[str] = field(default_factory=list)

    @property
    def loaded(self) -> int:
        return sum(self.classes.values())

    @property
    def skipped(self) -> int:
        return len(self.missing) + len(self.not_images) + len(self.too_small) + len(self.duplicates)

    def summary(self, max_items: int = 10) -> str:
        """Lines for a terminal or a UI: counts first, then up to ``max_items`` files per list."""
        cls = ", ".join(f"{k} {v}" for k, v in self.classes.items())
        lines = [
            f"{self.source} ({self.format}): {self.loaded} of {self.listed} images usable in {len(self.classes)} classes ({cls})"
        ]
        if any(k != "none" for k in self.splits):
            lines.append("splits: " + ", ".join(f"{k} {v}" for k, v in self.splits.items()))
        sections = [
            ("missing files (skipped)", [(p, "") for p in self.missing]),
            ("not usable as images (skipped)", self.not_images),
            ("smaller than the training size (skipped)", self.too_small),
            ("listed more than once (kept once)", [(p, "") for p in self.duplicates]),
            ("converted to 8-bit RGB", self.converted),
        ]
        for title, items in sections:
            if not items:
                continue
            lines.append(f"{len(items)} {title}:")
            for path, why in items[:max_items]:
                lines.append(f"  {path}" + (f": {why}" if why else ""))
            if len(items) > max_items:
                lines.append(f"  ... and {len(items) - max_items} more")
        lines.extend(self.notes)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(loaded=self.loaded, skipped=self.skipped)
        return d


class TileDataset:
    """Checked tiles as a torch-style dataset: ``ds[i] -> (image, class_index)``.

    ``size=None`` gives 8-bit RGB PIL images; ``size=N`` gives float tensors of
    shape (3, N, N) in [0, 1] (centre-cropped to a square, then resized), the
    torchvision convention: map to [-1, 1] for a VAE with ``x * 2 - 1``.
    """

    def __init__(self, records: Sequence[Record], classes: Sequence[str], report: LoadReport, size: int | None = None):
        self.records = list(records)
        self.classes = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.report = report
        self.size = size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        r = self.records[i]
        try:
            im = read_rgb(r.path)
        except (OSError, SyntaxError, ValueError) as exc:  # changed or damaged since it was checked
            raise DataError(f"cannot read {r.path}: {exc}") from exc
        label = self.class_to_idx[r.label]
        if self.size is None:
            return im, label
        import numpy as np
        import torch

        arr = torch.from_numpy(np.array(fit(im, self.size), dtype=np.uint8))
        return arr.permute(2, 0, 1).float().div_(255.0), label

    @property
    def labels(self) -> list[int]:
        return [self.class_to_idx[r.label] for r in self.records]

    @property
    def has_splits(self) -> bool:
        return any(r.split is not None for r in self.records)

    def split(self, name: str) -> TileDataset:
        """The records of one split, with the same classes (indices stay comparable)."""
        want = normalize_split(name)
        if not self.has_splits:
            raise DataError(
                f"{self.report.source} has no splits: call with_splits(seed=...) for a stratified split, "
                "or give a split column (or split folders); with patient or slide ids add a group column"
            )
        return TileDataset([r for r in self.records if r.split == want], self.classes, self.report, self.size)

    def with_splits(self, fractions: Mapping[str, float] | None = None, seed: int = 0) -> TileDataset:
        """A copy with a seeded stratified split (by group when every record has one)."""
        return TileDataset(stratified_split(self.records, fractions, seed), self.classes, self.report, self.size)


# ------------------------------------------------------------------ formats


def load_dataset(source: str | Path, **kw) -> TileDataset:
    """Any supported dataset: a folder, or a JSON or CSV index (told apart by content)."""
    p = Path(source)
    if p.is_dir():
        return load_folder(p, **kw)
    if not p.is_file():
        raise DataError(f"no dataset at {p}: give a folder of class subfolders, a .json or a .csv index")
    head = p.read_bytes()[:4096].decode("utf-8-sig", errors="replace").lstrip()
    if head.startswith(("[", "{")):
        return load_json(p, **kw)
    return load_csv(p, **kw)


def load_folder(root: str | Path, *, size: int | None = None, **kw) -> TileDataset:
    """``root/<class>/...`` or ``root/<split>/<class>/...``; every non-hidden file is a candidate."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder")
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not subdirs:
        raise DataError(f"{root} has no class subfolders: put the images in {root}/<class name>/")
    split_layout = all(d.name.lower() in SPLIT_ALIASES for d in subdirs)
    records: list[Record] = []
    classes: set[str] = set()
    for top in subdirs:
        split = normalize_split(top.name) if split_layout else None
        class_dirs = (
            sorted(d for d in top.iterdir() if d.is_dir() and not d.name.startswith(".")) if split_layout else [top]
        )
        if split_layout and not class_dirs:
            raise DataError(f"{top} has no class subfolders: put the images in {top}/<class name>/")
        for cdir in class_dirs:
            classes.add(cdir.name)
            files = [
                f
                for f in sorted(cdir.rglob("*"))
                if f.is_file() and not any(part.startswith(".") for part in f.relative_to(cdir).parts)
            ]
            # A .txt beside an image of the same name is that image's caption, not a candidate image.
            stems = {f.with_suffix("") for f in files if f.suffix.lower() != ".txt"}
            for f in files:
                if f.suffix.lower() == ".txt" and f.with_suffix("") in stems:
                    continue
                side = f.with_suffix(".txt")
                caption = side.read_text(encoding="utf-8-sig", errors="replace").strip() if side.is_file() else None
                records.append(Record(f, cdir.name, split, None, caption or None))
    layout = "split/class folders" if split_layout else "class folders"
    return _finish(records, sorted(classes), str(root), layout, size=size, **kw)


def load_json(
    paths: str | Path | Iterable[str | Path],
    *,
    label_names: Mapping[int, str] | Sequence[str] | None = None,
    split: str | None = None,
    size: int | None = None,
    **kw,
) -> TileDataset:
    """Chaoyang-style JSON: a list of ``{"name": path, "label": int or str}``; several files allowed."""
    files = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    names = _label_map(label_names)
    records: list[Record] = []
    for jf in files:
        try:
            data = json.loads(jf.read_text(encoding="utf-8-sig"))
        except FileNotFoundError:
            raise DataError(f"no JSON index at {jf}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{jf} is not valid JSON ({exc})") from None
        if not isinstance(data, list):
            raise DataError(f'{jf}: expected a list of {{"name": path, "label": int}}, found a {type(data).__name__}')
        file_split = normalize_split(split) if split else SPLIT_ALIASES.get(jf.stem.lower())
        for i, entry in enumerate(data):
            where = f"{jf.name} entry {i}"
            if not isinstance(entry, dict) or ("name" not in entry and "path" not in entry) or "label" not in entry:
                raise DataError(f'{where}: expected {{"name": path, "label": int}}, found {str(entry)[:80]}')
            label = _label_name(entry["label"], names, where)
            rec_split = normalize_split(entry["split"], f" in {where}") if entry.get("split") else file_split
            group = str(entry["group"]) if entry.get("group") not in (None, "") else None
            caption = next((str(entry[k]).strip() for k in CAPTION_COLUMNS if entry.get(k) not in (None, "")), None)
            path = jf.parent / str(entry.get("name", entry.get("path")))
            records.append(Record(path, label, rec_split, group, caption or None))
    declared = list(names.values()) if names else None
    classes = declared or _ordered_labels(r.label for r in records)
    source = ", ".join(str(f) for f in files)
    return _finish(records, classes, source, "json", size=size, **kw)


def load_csv(path: str | Path, *, size: int | None = None, **kw) -> TileDataset:
    """A CSV with a ``path,label[,split][,group]`` header (comma, semicolon or tab separated)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"no CSV index at {path}") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc}); save the CSV as UTF-8") from None
    first = text.splitlines()[0] if text.strip() else ""
    delimiter = max(",;\t", key=first.count) if first else ","
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    fields = {(f or "").strip().lower(): f for f in reader.fieldnames or []}
    missing = [c for c in ("path", "label") if c not in fields]
    if missing:
        raise DataError(
            f"{path}: the header needs columns path and label (and optionally split, group); missing {missing}, found {list(fields)}"
        )
    group_col = next((fields[c] for c in GROUP_COLUMNS if c in fields), None)
    caption_col = next((fields[c] for c in CAPTION_COLUMNS if c in fields), None)
    records = []
    for line, row in enumerate(reader, start=2):
        p, label = (row.get(fields["path"]) or "").strip(), (row.get(fields["label"]) or "").strip()
        if not p or not label:
            raise DataError(f"{path} line {line}: empty {'path' if not p else 'label'}")
        split = normalize_split(row.get(fields["split"]), f" at {path.name} line {line}") if "split" in fields else None
        group = ((row.get(group_col) or "").strip() or None) if group_col else None
        caption = ((row.get(caption_col) or "").strip() or None) if caption_col else None
        records.append(Record(path.parent / p, label, split, group, caption))
    return _finish(records, _ordered_labels(r.label for r in records), str(path), "csv", size=size, **kw)


# ------------------------------------------------------------------ checking


def _finish(
    records: list[Record],
    classes: list[str],
    source: str,
    fmt: str,
    *,
    size: int | None = None,
    min_size: int | None = None,
    on_small: str = "skip",
    strict: bool = False,
) -> TileDataset:
    if on_small not in SMALL_POLICIES:
        raise InvalidRequest(f"on_small must be one of {SMALL_POLICIES}, not {on_small!r}")
    if size is not None and (not isinstance(size, int) or size < 8):
        raise InvalidRequest(f"size must be an integer >= 8, not {size!r}")
    min_side = min_size if min_size is not None else size
    report = LoadReport(source=source, format=fmt, listed=len(records))
    kept: list[Record] = []
    seen: dict[Path, Record] = {}
    for r in records:
        key = r.path.resolve()
        if key in seen:
            if seen[key].label != r.label:
                raise DataError(f"{r.path} is listed with two labels, {seen[key].label!r} and {r.label!r}")
            report.duplicates.append(str(r.path))
            continue
        seen[key] = r
        if not r.path.exists():
            report.missing.append(str(r.path))
            continue
        try:
            info: ImageInfo = inspect(r.path)
        except NotUsable as exc:
            report.not_images.append((str(r.path), str(exc)))
            continue
        if min_side and min(info.width, info.height) < min_side:
            report.too_small.append((str(r.path), f"{info.width}x{info.height}, needs at least {min_side}x{min_side}"))
            continue
        if info.conversion:
            report.converted.append((str(r.path), info.conversion))
        kept.append(r)
    counts = Counter(r.label for r in kept)
    report.classes = {c: counts.get(c, 0) for c in classes}
    report.splits = dict(sorted(Counter(r.split or "none" for r in kept).items()))
    if report.too_small and on_small == "error":
        raise DataError(f"{len(report.too_small)} images are smaller than {min_side}x{min_side}:\n" + report.summary())
    if strict and report.skipped:
        raise DataError(f"{report.skipped} files of {source} cannot be used (strict mode):\n" + report.summary())
    if not kept:
        raise DataError(f"{source} has no usable images:\n" + report.summary())
    empty = [c for c in classes if counts.get(c, 0) == 0]
    if empty:
        raise DataError(
            f"class{'es' if len(empty) > 1 else ''} {', '.join(repr(c) for c in empty)} of {source} "
            f"{'have' if len(empty) > 1 else 'has'} no usable images; add images or remove the class:\n"
            + report.summary()
        )
    if any(r.group is not None for r in kept):
        check_no_leakage(kept)
    if not any(r.split for r in kept):
        report.notes.append(
            "no split given: use TileDataset.with_splits(seed=...) for a stratified split; "
            "if tiles share patients or slides, add a group column so that each stays in one split"
        )
    return TileDataset(kept, classes, report, size)


def _label_map(label_names) -> dict[int, str] | None:
    if label_names is None:
        return None
    if isinstance(label_names, Mapping):
        return {int(k): str(v) for k, v in sorted(label_names.items(), key=lambda kv: int(kv[0]))}
    return {i: str(v) for i, v in enumerate(label_names)}


def _label_name(value, names: dict[int, str] | None, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise DataError(f"{where}: label {value!r} is neither an integer nor a name")
    if names is None:
        return str(value)
    if isinstance(value, str) and not value.strip().lstrip("-").isdigit():
        if value in names.values():
            return value
        raise DataError(f"{where}: label {value!r} is not one of the label names {list(names.values())}")
    if int(value) not in names:
        raise DataError(f"{where}: label {value} has no name in label_names {names}")
    return names[int(value)]


def _ordered_labels(labels: Iterable[str]) -> list[str]:
    """Distinct labels, numerically when all are integers (so that '10' follows '9')."""
    uniq = set(labels)
    if uniq and all(u.lstrip("-").isdigit() for u in uniq):
        return sorted(uniq, key=int)
    return sorted(uniq)
