"""The images a training run learns from, and the held-out ones it validates on.

``load_training_data(source, ...)``: ``source`` is a dataset folder / JSON /
CSV (read by histolab.data.loaders, which skips and lists unusable files), or
``"bundled"`` for the bundled crops. A dataset with splits trains on its train
split and validates on its val split; one without splits gets a seeded,
stratified 90/10 train/val split (the test split is never touched here).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from histolab.errors import DataError

BUNDLED = "bundled"
NO_SPLIT_FRACTIONS = {"train": 0.9, "val": 0.1}


@dataclass
class TrainingData:
    source: str
    classes: list[str]
    images: list[Image.Image]  # train split, 8-bit RGB, as read (not resized)
    labels: list[str]
    val_images: list[Image.Image] = field(default_factory=list)
    val_labels: list[str] = field(default_factory=list)
    report: object | None = None  # histolab.data.loaders.LoadReport for user datasets
    notes: list[str] = field(default_factory=list)
    captions: list[str | None] = field(default_factory=list)  # per training image; [] = none given

    def caption(self, i: int) -> str | None:
        return self.captions[i] if self.captions else None

    def counts(self) -> dict[str, int]:
        c = Counter(self.labels)
        return {k: c.get(k, 0) for k in self.classes}

    def fingerprint(self) -> str:
        """sha256 over every training image's pixels and label: a resume must see the same data."""
        h = hashlib.sha256()
        for i, (im, lab) in enumerate(zip(self.images, self.labels, strict=True)):
            h.update(f"{lab}:{im.width}x{im.height}:".encode())
            h.update(im.tobytes())
            if self.captions:  # only where captions are given: older runs keep their fingerprint
                h.update(f"caption:{self.captions[i]}".encode())
        return h.hexdigest()

    def summary(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in self.counts().items())
        vc = Counter(self.val_labels)
        val = ", ".join(f"{k} {vc.get(k, 0)}" for k in self.classes)
        lines = [f"data {self.source}: train {len(self.images)} ({counts}); val {len(self.val_images)} ({val})"]
        if self.report is not None and getattr(self.report, "skipped", 0):
            lines.append(self.report.summary())
        lines.extend(self.notes)
        return "\n".join(lines)


def label_slug(label: str) -> str:
    """A class name as one prompt word: 'Adenocarcinoma tissue' -> 'adenocarcinoma_tissue'."""
    return re.sub(r"[^0-9a-z]+", "_", label.strip().lower()).strip("_") or "class"


def load_training_data(
    source: str | Path,
    *,
    min_per_class: int = 1,
    max_per_class: int | None = None,
    seed: int = 0,
    label_names: str = "",
    only_classes: str = "",
    holdout: str = "val",
) -> TrainingData:
    if str(source) == BUNDLED and label_names:
        raise DataError(
            f"label_names {label_names!r} names a JSON dataset's integer labels; the bundled data has names"
        )
    data = (
        _bundled(max_per_class, seed, holdout)
        if str(source) == BUNDLED
        else _user(Path(source), max_per_class, seed, label_names, holdout)
    )
    if only_classes:
        data = _only(data, only_classes)
    few = {c: n for c, n in data.counts().items() if n < min_per_class}
    if few:
        c, n = next(iter(few.items()))
        raise DataError(
            f"class {c!r} has {n} usable training image{'s' if n != 1 else ''}; at least {min_per_class} are needed "
            f"(min_images_per_class). Add images, remove the class, or lower min_images_per_class."
            + (
                f" Other classes below it: {', '.join(f'{k} {v}' for k, v in list(few.items())[1:])}."
                if len(few) > 1
                else ""
            )
            + ("\n" + data.report.summary() if data.report is not None else "")
        )
    return data


def _pick(indices_by_class: dict[str, list[int]], max_per_class: int | None, seed: int) -> list[int]:
    import numpy as np

    if max_per_class is None:
        return sorted(i for idx in indices_by_class.values() for i in idx)
    rng = np.random.default_rng(seed)
    out = []
    for c in sorted(indices_by_class):
        idx = indices_by_class[c]
        if len(idx) > max_per_class:
            idx = [idx[j] for j in sorted(rng.choice(len(idx), size=max_per_class, replace=False))]
        out.extend(idx)
    return sorted(out)


def _only(data: TrainingData, only_classes: str) -> TrainingData:
    """The data of the named classes only (one model per class, as the 2025 colon study trains)."""
    import dataclasses

    want = [c.strip() for c in only_classes.split(",") if c.strip()]
    unknown = [c for c in want if c not in data.classes]
    if unknown:
        raise DataError(f"only_classes names {unknown[0]!r}, which {data.source} does not have; it has {data.classes}")
    keep = [i for i, lab in enumerate(data.labels) if lab in want]
    vkeep = [i for i, lab in enumerate(data.val_labels) if lab in want]
    return dataclasses.replace(
        data,
        classes=[c for c in data.classes if c in want],
        images=[data.images[i] for i in keep],
        labels=[data.labels[i] for i in keep],
        captions=[data.captions[i] for i in keep] if data.captions else [],
        val_images=[data.val_images[i] for i in vkeep],
        val_labels=[data.val_labels[i] for i in vkeep],
        notes=[*data.notes, f"only class{'es' if len(want) > 1 else ''} {', '.join(want)}"],
    )


def _bundled(max_per_class: int | None, seed: int, holdout: str = "val") -> TrainingData:
    from histolab.data import bundled

    train = bundled.crops("train") + (bundled.crops("val") if holdout == "none" else [])
    by_class: dict[str, list[int]] = {}
    for i, c in enumerate(train):
        by_class.setdefault(c.label, []).append(i)
    chosen = [train[i] for i in _pick(by_class, max_per_class, seed)]
    val = bundled.crops("val") if holdout != "none" else []
    classes = bundled.labels()
    return TrainingData(
        source=BUNDLED,
        classes=classes,
        images=[bundled.load_crop(c) for c in chosen],
        labels=[c.label for c in chosen],
        val_images=[bundled.load_crop(c) for c in val],
        val_labels=[c.label for c in val],
        notes=["bundled crops: train band for training, validation band for validation (disjoint regions)"],
    )


LABEL_NAME_SETS = {"chaoyang": "CHAOYANG_LABEL_NAMES"}


def label_names_for(spec: str):
    """'chaoyang' (Chaoyang's four classes in its label order) or comma-separated names in label order."""
    from histolab.data import loaders

    key = spec.strip().lower()
    if key in LABEL_NAME_SETS:
        return getattr(loaders, LABEL_NAME_SETS[key])
    return [x.strip() for x in spec.split(",") if x.strip()]


def is_json_index(path: Path) -> bool:
    """Whether ``path`` is a JSON index (judged by its first bytes, not its name)."""
    if not path.is_file():
        return False
    head = path.read_bytes()[:4096].decode("utf-8-sig", errors="replace").lstrip()
    return head.startswith(("[", "{"))


def _user(
    path: Path, max_per_class: int | None, seed: int, label_names: str = "", holdout: str = "val"
) -> TrainingData:
    import dataclasses

    from histolab.data.loaders import TileDataset, load_dataset, load_json
    from histolab.data.splits import stratified_split

    notes = []
    if label_names and is_json_index(path):
        ds = load_json(path, label_names=label_names_for(label_names))
    else:
        if label_names:
            notes.append(f"label_names {label_names!r} ignored: it names the integer labels of a JSON index")
        ds = load_dataset(path)
    if holdout == "none":
        # Nothing held out: every non-test image trains (the test split stays untouched).
        recs = [r if r.split == "test" else dataclasses.replace(r, split="train") for r in ds.records]
        ds = TileDataset(recs, ds.classes, ds.report, ds.size)
        ds.report.notes = [n for n in ds.report.notes if not n.startswith("no split given")]
        notes.append("holdout none: every non-test image trains; no validation")
    elif not ds.has_splits:
        ds = ds.with_splits(NO_SPLIT_FRACTIONS, seed=seed)
        # The loader's advice to split is taken here: say what was done instead.
        ds.report.notes = [n for n in ds.report.notes if not n.startswith("no split given")]
        notes.append(f"no split in {path}: a seeded stratified 90/10 train/val split (seed {seed})")
    elif not any(r.split == "val" for r in ds.records):
        # A train-only index (e.g. Chaoyang's train.json): a validation share carved from train, by group if given.
        train = [dataclasses.replace(r, split=None) for r in ds.records if r.split == "train"]
        rest = [r for r in ds.records if r.split not in ("train", None)]
        ds = TileDataset(stratified_split(train, NO_SPLIT_FRACTIONS, seed) + rest, ds.classes, ds.report, ds.size)
        notes.append(f"no validation split in {path}: 10% of the train split set aside for validation (seed {seed})")
    report = ds.report
    train_idx = {c: [] for c in ds.classes}
    for i, r in enumerate(ds.records):
        if r.split == "train":
            train_idx[r.label].append(i)
    chosen = _pick(train_idx, max_per_class, seed)
    images, labels, captions = _read(ds, chosen, report)
    val = [i for i, r in enumerate(ds.records) if r.split == "val"]
    val_images, val_labels, _ = _read(ds, val, report)
    if not val and holdout != "none":
        notes.append("no validation split: per-epoch validation is skipped")
    given = captions if any(c is not None for c in captions) else []
    if given:
        n = sum(c is not None for c in given)
        notes.append(f"captions: {n} of {len(given)} training images have their own caption")
    return TrainingData(str(path), list(ds.classes), images, labels, val_images, val_labels, report, notes, given)


def _read(ds, indices: list[int], report) -> tuple[list[Image.Image], list[str], list[str | None]]:
    """Decode the chosen images; one that became unreadable since it was checked is skipped and listed."""
    images, labels, captions = [], [], []
    for i in indices:
        try:
            im, _ = ds[i]
        except DataError as exc:
            report.not_images.append((str(ds.records[i].path), str(exc)))
            counts = report.classes
            counts[ds.records[i].label] = max(0, counts.get(ds.records[i].label, 0) - 1)
            continue
        images.append(im)
        labels.append(ds.records[i].label)
        captions.append(ds.records[i].caption)
    return images, labels, captions
