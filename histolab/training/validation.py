"""Per-epoch validation: the hook the loop calls, and the FID validator behind it.

A validator is any callable ``(images, labels) -> {metric: value}`` with a
``metric`` attribute naming the number that ranks epochs and
``lower_is_better``. The default, ``FidValidator``, is histolab.evaluation's
validation protocol: the validation split's Inception features computed once
(and cached in the run's folder), each epoch's generated images compared with
them (FID overall and per class), as the 2026 paper chose its checkpoint by
FID per epoch. Where histolab.evaluation is not installed the run goes on
without ranking epochs, and says so in its log and manifest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable


@runtime_checkable
class Validator(Protocol):
    metric: str
    lower_is_better: bool

    def __call__(self, images: list, labels: list[str]) -> dict[str, float]: ...


class FidValidator:
    metric = "inception/fid"
    lower_is_better = True

    def __init__(
        self, real_images: list, real_labels: list[str], *, cache_path: Path | None = None, device: str = "cpu"
    ):
        from histolab.evaluation.extractors import InceptionExtractor
        from histolab.evaluation.validation import ValidationReference

        self.reference = ValidationReference.build(
            list(real_images), [InceptionExtractor(device=device)], labels=list(real_labels), cache_path=cache_path
        )

    def __call__(self, images: list, labels: list[str]) -> dict[str, float]:
        from histolab.evaluation.validation import validation_metrics

        return validation_metrics(self.reference, list(images), labels=list(labels))


def make_validator(cfg, data, workdir: Path, device: str, log) -> Validator | None:
    """The validator a config asks for, or None (with the reason logged)."""
    if cfg.validation == "none":
        return None
    if not data.val_images:
        log("validation: the dataset has no validation images; epochs are saved but not ranked")
        return None
    try:
        import histolab.evaluation.validation  # noqa: F401
    except ImportError as exc:
        log(f"validation: histolab.evaluation is not available ({exc}); epochs are saved but not ranked")
        return None
    images, labels = subset(data.val_images, data.val_labels, cfg.val_reference_images, cfg.seed)
    log(f"validation: FID against {len(images)} validation images (features computed once)")
    return FidValidator(images, labels, cache_path=workdir / "val_reference.safetensors", device=device)


def subset(images: list, labels: list[str], limit: int, seed: int) -> tuple[list, list[str]]:
    """At most ``limit`` items, each class keeping its share (seeded), in their original order."""
    import numpy as np

    if len(images) <= limit:
        return list(images), list(labels)
    rng = np.random.default_rng(seed)
    groups = {lab: [i for i, x in enumerate(labels) if x == lab] for lab in sorted(set(labels))}
    # Shares by largest remainder, at least one per class: exactly ``limit`` in all.
    exact = {lab: limit * len(idx) / len(images) for lab, idx in groups.items()}
    take = {lab: max(1, int(v)) for lab, v in exact.items()}
    by_remainder = sorted(groups, key=lambda lab: exact[lab] - int(exact[lab]), reverse=True)
    while sum(take.values()) < limit:
        lab = next(x for x in by_remainder if take[x] < len(groups[x]))
        take[lab] += 1
        by_remainder.remove(lab)
        by_remainder.append(lab)
    while sum(take.values()) > limit:
        take[max(take, key=take.get)] -= 1
    keep: list[int] = []
    for lab, idx in groups.items():
        keep += [idx[j] for j in rng.choice(len(idx), size=take[lab], replace=False)]
    keep.sort()
    return [images[i] for i in keep], [labels[i] for i in keep]


def better(a: float, b: float | None, lower_is_better: bool) -> bool:
    if b is None:
        return True
    return a < b if lower_is_better else a > b
