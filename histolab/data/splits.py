"""Train/val/test splits without leakage.

Tiles cut from one slide (or one patient) look alike far beyond their class:
stain batch, scanner, tissue thickness. A split that puts tiles of one slide in
both train and test measures memorisation, not generalisation, and an FID
between such splits is optimistic. So:

* when the data says which patient or slide a tile comes from (a ``group``
  column in the CSV), split by group: every group lands in one split whole;
* otherwise ``stratified_split`` splits tile by tile, stratified by class and
  seeded, and that is only honest if every tile comes from a different source.
  Users with patient or slide ids should add them as a ``group`` column.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Mapping

import numpy as np

from histolab.errors import DataError, InvalidRequest

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}
# 80/10/10: enough validation images per class for FID-style checks on a few
# hundred tiles per class, without starving the fine-tuning set.
DEFAULT_FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


def normalize_split(value: str | None, where: str = "") -> str | None:
    if value is None or str(value).strip() == "":
        return None
    key = str(value).strip().lower()
    if key not in SPLIT_ALIASES:
        raise DataError(f"unknown split {value!r}{where}: use one of train, val, test (or leave it empty)")
    return SPLIT_ALIASES[key]


def check_no_leakage(records: Iterable) -> None:
    """Raise if any group (patient/slide) has records in more than one split."""
    seen: dict[str, set[str]] = collections.defaultdict(set)
    for r in records:
        if r.group is not None and r.split is not None:
            seen[r.group].add(r.split)
    leaks = sorted((g, s) for g, s in seen.items() if len(s) > 1)
    if leaks:
        shown = "; ".join(f"group {g!r} in {', '.join(sorted(s))}" for g, s in leaks[:5])
        raise DataError(
            f"{len(leaks)} groups have images in more than one split ({shown}"
            + (", ..." if len(leaks) > 5 else "")
            + "): images of one patient or slide in two splits leak; put each group in one split"
        )


def _check_fractions(fractions: Mapping[str, float]) -> dict[str, float]:
    unknown = set(fractions) - set(SPLITS)
    if unknown:
        raise InvalidRequest(f"unknown split names {sorted(unknown)}: use train, val, test")
    fr = {s: float(fractions.get(s, 0.0)) for s in SPLITS}
    if any(v < 0 for v in fr.values()) or abs(sum(fr.values()) - 1.0) > 1e-6 or fr["train"] <= 0:
        raise InvalidRequest(f"split fractions must be >= 0, sum to 1 and give train a share, but are {fr}")
    return fr


def _counts(n: int, fr: dict[str, float]) -> dict[str, int]:
    """Items per split for a stratum of n: rounded, train keeps at least one."""
    test = round(n * fr["test"])
    val = round(n * fr["val"])
    while test + val >= n and (test or val):
        if test >= val and test:
            test -= 1
        else:
            val -= 1
    return {"train": n - test - val, "val": val, "test": test}


def stratified_split(records: list, fractions: Mapping[str, float] | None = None, seed: int = 0) -> list:
    """Records with ``split`` set: stratified by label, seeded, by group when groups are given.

    Without groups each class is shuffled and cut by ``fractions``. With groups
    (every record has one) whole groups are dealt out: within each class (a
    group's class is its most common label) groups are shuffled and each goes
    to the split furthest below its share of that class's images.
    """
    fr = _check_fractions(fractions or DEFAULT_FRACTIONS)
    if not records:
        raise DataError("no records to split")
    have_group = [r.group is not None for r in records]
    rng = np.random.default_rng(seed)
    # Work in a canonical order so that the result depends on the seed, not on the input order.
    order = sorted(range(len(records)), key=lambda i: (records[i].label, str(records[i].path)))
    ordered = [records[i] for i in order]
    if any(have_group) and not all(have_group):
        missing = next(r for r in ordered if r.group is None)
        raise DataError(f"some records have a group and some do not (e.g. {missing.path}); give every row a group")
    assign: dict[int, str] = {}
    if not any(have_group):
        by_label: dict[str, list[int]] = collections.defaultdict(list)
        for i, r in enumerate(ordered):
            by_label[r.label].append(i)
        for label in sorted(by_label):
            idx = [by_label[label][j] for j in rng.permutation(len(by_label[label]))]
            c = _counts(len(idx), fr)
            cuts = {"test": idx[: c["test"]], "val": idx[c["test"] : c["test"] + c["val"]]}
            for i in idx:
                assign[i] = "train"
            for split, members in cuts.items():
                for i in members:
                    assign[i] = split
    else:
        groups: dict[str, list[int]] = collections.defaultdict(list)
        for i, r in enumerate(ordered):
            groups[r.group].append(i)
        stratum: dict[str, list[str]] = collections.defaultdict(list)
        for g in sorted(groups):
            labels = collections.Counter(ordered[i].label for i in groups[g])
            top = max(sorted(labels), key=lambda lab: labels[lab])
            stratum[top].append(g)
        for label in sorted(stratum):
            gs = [stratum[label][j] for j in rng.permutation(len(stratum[label]))]
            total = sum(len(groups[g]) for g in gs)
            target = {s: fr[s] * total for s in SPLITS}
            have = dict.fromkeys(SPLITS, 0)
            for k, g in enumerate(gs):
                # The first group of each class goes to train: every class keeps a training group.
                split = "train" if k == 0 else max(SPLITS, key=lambda s: (target[s] - have[s], -SPLITS.index(s)))
                have[split] += len(groups[g])
                for i in groups[g]:
                    assign[i] = split
    split_of = {order[i]: assign[i] for i in range(len(order))}
    return [dataclasses.replace(r, split=split_of[i]) for i, r in enumerate(records)]
