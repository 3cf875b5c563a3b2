"""One evaluation: real vs fake in every feature space, overall and per class.

The numbers and the protocol that produced them go into one dict (the JSON
report); warnings about sizes that bias a metric are collected there too and
printed by the caller.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from histolab.errors import DataError, InvalidRequest
from histolab.evaluation import metrics
from histolab.evaluation.extractors import INCEPTION
from histolab.evaluation.features import ALL, SpaceFeatures


@dataclass(frozen=True)
class EvalConfig:
    per_class: bool = False
    batch_size: int = 32  # images per forward pass; results do not depend on it
    kid_subsets: int = 100  # Bińkowski et al. and torch-fidelity's default
    kid_subset_size: int = 1000  # torch-fidelity's default; cut to the smaller set's size when larger
    pr_k: int = 3  # Kynkäänniemi et al. 2019
    is_splits: int = 10  # Salimans et al. 2016
    seed: int = 0  # KID subsets
    # Memorisation: a synthetic image is a near-copy when it is closer (cosine
    # distance) to its nearest training image than this quantile of the
    # distances from held-out real images to their nearest training image,
    # i.e. closer than 99% of genuinely new real tissue gets. With no held-out
    # set the fixed threshold below is used instead.
    near_copy_quantile: float = 0.01
    near_copy_distance: float = 0.01  # cosine distance (similarity 0.99): fallback without a held-out set
    nn_pairs_reported: int = 16  # nearest-neighbour pairs kept for the report and its figure

    def validate(self) -> EvalConfig:
        if self.batch_size < 1:
            raise InvalidRequest(f"batch size must be at least 1, got {self.batch_size}")
        if self.kid_subsets < 1 or self.kid_subset_size < 2:
            raise InvalidRequest(
                f"KID needs subsets >= 1 and subset size >= 2, got {self.kid_subsets}, {self.kid_subset_size}"
            )
        if self.pr_k < 1:
            raise InvalidRequest(f"precision/recall k must be at least 1, got {self.pr_k}")
        if not 0 < self.near_copy_quantile < 1:
            raise InvalidRequest(f"near-copy quantile must be in (0, 1), got {self.near_copy_quantile}")
        return self


def metric_name(space: str) -> str:
    """'fid' in Inception space, 'fd' (Fréchet distance) in any other."""
    return "fid" if space == INCEPTION else "fd"


def compare(
    real: SpaceFeatures,
    fake: SpaceFeatures,
    config: EvalConfig,
    *,
    logits_fn: Callable[[np.ndarray], np.ndarray] | None = None,
    warn: Callable[[str], None] = print,
) -> dict:
    """Every metric between two sets in one space: overall, and per class when asked."""
    if real.space != fake.space or real.dim != fake.dim:
        raise InvalidRequest(f"cannot compare {real.space} features with {fake.space} features")
    out = {"overall": _pair(real, fake, None, config, logits_fn, warn)}
    if config.per_class:
        classes = [c for c in real.classes if c in fake.classes]
        if not classes:
            raise DataError(
                f"per-class evaluation needs classes in both sets: real {real.spec} has {real.classes or 'none'}, "
                f"fake {fake.spec} has {fake.classes or 'none'} (use class subfolders, a CSV with labels, or bundled:)"
            )
        missing = sorted(set(real.classes) ^ set(fake.classes))
        if missing:
            warn(f"[{real.space}] classes in only one set are left out of per-class metrics: {', '.join(missing)}")
        out["per_class"] = {c: _pair(real, fake, c, config, logits_fn, warn) for c in classes}
    return out


def _pair(real, fake, label, config, logits_fn, warn) -> dict:
    key = ALL if label is None else label
    sr, sf = real.stats[key], fake.stats[key]
    where = f"[{real.space}{'' if label is None else ' / ' + label}]"
    res: dict = {"n_real": sr.n, "n_fake": sf.n}
    if min(sr.n, sf.n) < 4:
        warn(f"{where} fewer than 4 images in a set ({sr.n} real, {sf.n} fake): no metrics")
        return res
    if min(sr.n, sf.n) <= real.dim:
        warn(
            f"{where} {metric_name(real.space).upper()} from {sr.n} real and {sf.n} fake images in {real.dim} "
            "dimensions: the covariance is rank-deficient and the value is biased upward at this size; "
            "compare it only with values computed at the same n"
        )
    if real.features is not None and fake.features is not None and max(sr.n, sf.n) <= real.dim:
        # Same value, from the rows: an n x n SVD instead of d x d eigendecompositions (see metrics).
        res[metric_name(real.space)] = metrics.frechet_distance_of_features(real.rows(label), fake.rows(label))
    else:
        res[metric_name(real.space)] = metrics.frechet_distance(sr.mean, sr.cov, sf.mean, sf.cov)
    for name, side in (("vendi_real", real), ("vendi_fake", fake)):
        g = side.grams[key]
        # From the rows where they are kept and fewer than the dimension (same value, an n x n problem).
        rows = side.rows(label) if side.features is not None and g.n < side.dim else None
        res[name] = metrics.vendi_score(rows) if rows is not None else metrics.vendi_from_gram(g.g, g.n)
    if real.features is None or fake.features is None:
        return res
    fr, ff = real.rows(label), fake.rows(label)
    k = metrics.kid(fr, ff, subsets=config.kid_subsets, subset_size=config.kid_subset_size, seed=config.seed)
    if k["kid_subset_size"] < config.kid_subset_size:
        warn(
            f"{where} KID subset size {config.kid_subset_size} > images available ({min(len(fr), len(ff))}): "
            f"using subsets of {k['kid_subset_size']} (half the smaller set)"
        )
    res.update(k)
    res["kid_x1000_mean"] = k["kid_mean"] * 1000
    res["kid_x1000_std"] = k["kid_std"] * 1000
    if min(len(fr), len(ff)) > config.pr_k:
        res.update(metrics.precision_recall(fr, ff, k=config.pr_k))
    else:
        warn(f"{where} precision/recall needs more than k={config.pr_k} images per set")
    if logits_fn is not None:
        if len(ff) >= config.is_splits:
            res.update(metrics.inception_score(logits_fn(ff), splits=config.is_splits))
        else:
            warn(f"{where} Inception Score needs at least {config.is_splits} images")
    return res


def memorisation(fake: SpaceFeatures, train: SpaceFeatures, held_out: SpaceFeatures | None, config: EvalConfig) -> dict:
    """For every synthetic image its nearest training image (cosine distance), near-copies flagged."""
    if fake.features is None or train.features is None:
        raise ValueError("memorisation needs the features kept")
    idx, dist = metrics.nearest_neighbours(fake.features, train.features)
    rule: dict
    if held_out is not None and held_out.features is not None and len(held_out) >= 2:
        _, base = metrics.nearest_neighbours(held_out.features, train.features)
        threshold = float(np.quantile(base, config.near_copy_quantile))
        rule = {
            "rule": f"distance below the {config.near_copy_quantile:g} quantile of held-out real -> train distances",
            "held_out_nn_distance_median": float(np.median(base)),
            "held_out_nn_distance_min": float(base.min()),
        }
    else:
        threshold = config.near_copy_distance
        rule = {"rule": "distance below the fixed threshold (no held-out set given)"}
    flagged = dist < threshold
    order = np.argsort(dist)
    pairs = [
        {
            "fake": fake.names[i],
            "train": train.names[int(idx[i])],
            "distance": float(dist[i]),
            "near_copy": bool(flagged[i]),
        }
        for i in range(len(dist))
    ]
    return {
        "metric": "cosine distance (1 - cosine similarity)",
        "threshold": threshold,
        **rule,
        "near_copies": int(flagged.sum()),
        "near_copy_fraction": float(flagged.mean()) if len(flagged) else 0.0,
        "fake_nn_distance_median": float(np.median(dist)),
        "fake_nn_distance_min": float(dist.min()),
        "closest_pairs": [pairs[i] for i in order[: config.nn_pairs_reported]],
        "pairs": pairs,
    }


def config_dict(config: EvalConfig) -> dict:
    return asdict(config)
