"""``evaluate_sets``: open, extract, compare, report; the library call behind ``python -m histolab evaluate``."""

from __future__ import annotations

import time
from collections.abc import Callable

from histolab.errors import InvalidRequest
from histolab.evaluation.evaluate import EvalConfig, compare, config_dict, memorisation
from histolab.evaluation.extractors import INCEPTION
from histolab.evaluation.features import collect_cached

IS_UNAVAILABLE = (
    "not computed: the Inception Score needs the network's 1008-class softmax layer, which default_1.pt "
    "(the offline FID weights) does not carry; pass --inception-head with torch-fidelity's "
    "weights-inception-2015-12-05-6726825d.pth or pytorch-fid's pt_inception-2015-12-05-6726825d.pth"
)


def evaluate_sets(
    real,
    fake,
    extractors: list,
    config: EvalConfig | None = None,
    *,
    train=None,
    warn: Callable[[str], None] = print,
    progress: Callable[[str, int, int], None] | None = None,
    feature_cache=None,
) -> dict:
    """Metrics of ``fake`` against ``real`` (ImageSets) in every extractor's space.

    ``train``: the generator's training images; when given, each synthetic image's
    nearest training image is found (memorisation), with ``real`` as the held-out
    baseline for the near-copy threshold. ``feature_cache``: a folder where
    features are kept and reused for the same images, space and weights.
    """
    config = (config or EvalConfig()).validate()
    if not extractors:
        raise InvalidRequest("no feature space chosen")
    names = [e.name for e in extractors]
    if len(set(names)) != len(names):
        raise InvalidRequest(f"a feature space is listed twice: {names}")
    warnings: list[str] = []

    def _warn(msg: str) -> None:
        warnings.append(msg)
        warn(f"warning: {msg}")

    t0 = time.perf_counter()
    sets = {"real": real, "fake": fake, **({"train": train} if train is not None else {})}
    feats = {}
    for role, s in sets.items():
        cb = (lambda d, n, role=role: progress(role, d, n)) if progress else None
        feats[role] = collect_cached(extractors, s, feature_cache, batch_size=config.batch_size, progress=cb)
    report: dict = {
        "sets": {role: _describe(s) for role, s in sets.items()},
        "config": config_dict(config),
        "spaces": {},
    }
    for ex in extractors:
        logits_fn = ex.logits if getattr(ex, "has_logits", False) else None
        space = compare(feats["real"][ex.name], feats["fake"][ex.name], config, logits_fn=logits_fn, warn=_warn)
        space["extractor"] = {"name": ex.name, "dim": ex.dim, "weights_sha256": ex.weights_hash}
        if ex.name == INCEPTION and logits_fn is None:
            space["inception_score_note"] = IS_UNAVAILABLE
        if train is not None:
            space["memorisation"] = memorisation(
                feats["fake"][ex.name], feats["train"][ex.name], feats["real"][ex.name], config
            )
        report["spaces"][ex.name] = space
    report["warnings"] = warnings
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return report


def _describe(s) -> dict:
    counts: dict[str, int] = {}
    for lab in s.labels:
        counts[lab if lab is not None else "(none)"] = counts.get(lab if lab is not None else "(none)", 0) + 1
    return {"spec": s.spec, "n": len(s), "classes": counts}
