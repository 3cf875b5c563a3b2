"""Analysis of the per-prompt ranks (histolab.review.prompt_rank): the Prompt-to-Polyp protocol's figures.

* Mean rank per source (1 = best) with a 95% percentile interval from a bootstrap over the rank groups (the
  prompt images that were sampled; a group's ranks by every rater move together), and each source's count of
  every rank.
* How often the real image is ranked first: k of n rankings, a Wilson interval, and the exact binomial test
  against chance (1/N with N images per group).
* Metrics by rank tier: for each rank r, the sources that received it (with counts) and the mean of every
  metric over the rankings at that tier: a set metric (FID, KID, ... of the source, from a metrics file)
  counts once per ranking in which its source got rank r; an item metric (a per-image score keyed by the
  image's hash) once per ranked image. The real image has no set metrics, so it adds none.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import stats as sstats

from histolab.review.metrics_file import Metrics
from histolab.review.stats import binomial_ci, cluster_bootstrap_mean
from histolab.review.store import Store


@dataclass(frozen=True)
class RankRow:
    rater: str
    group: int
    source: str
    rank: int
    hashes: tuple[str, ...] = ()  # the ranked image's file sha256 and pixel hash (for item metrics)


@dataclass
class SourceRank:
    source: str
    n: int
    mean_rank: float
    ci: tuple[float, float]
    counts: dict[int, int]  # rank -> how often this source got it


@dataclass
class Tier:
    rank: int
    n: int  # rankings at this tier
    sources: dict[str, int]  # source -> how often it got this rank
    set_metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # metric -> {mean, n}
    item_metrics: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class PromptRankSummary:
    n_images: int  # N: images per group, ranks 1..N
    groups: int
    raters: int
    rankings: int  # (group, rater) pairs ranked
    real_source: str
    sources: list[SourceRank]  # best mean rank first
    real_first: int
    real_first_rate: float
    real_first_ci: tuple[float, float]
    chance: float  # 1/N
    real_first_p: float  # exact two-sided binomial test of real_first / rankings against 1/N
    tiers: list[Tier]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        out = [
            f"per-prompt ranking: {self.rankings} rankings ({self.groups} groups x {self.raters} raters), "
            f"ranks 1..{self.n_images} (1 = best)",
            f"  real image ranked first: {self.real_first}/{self.rankings} = {self.real_first_rate:.3f} "
            f"(95% CI {self.real_first_ci[0]:.3f}-{self.real_first_ci[1]:.3f}; chance {self.chance:.3f}, "
            f"p = {self.real_first_p:.3g})",
            "  mean rank per source (95% CI, bootstrap over groups):",
        ]
        for s in self.sources:
            tag = " (real)" if s.source == self.real_source else ""
            counts = ", ".join(f"#{r}: {c}" for r, c in sorted(s.counts.items()))
            out.append(f"    {s.source}{tag}: {s.mean_rank:.2f} ({s.ci[0]:.2f}-{s.ci[1]:.2f}); {counts}")
        out.append("  by rank tier:")
        for t in self.tiers:
            srcs = ", ".join(f"{k} x{v}" for k, v in sorted(t.sources.items()))
            ms = "; ".join(
                f"{kind} {m} {d['mean']:.4g} (n={int(d['n'])})"
                for kind, table in (("set", t.set_metrics), ("item", t.item_metrics))
                for m, d in sorted(table.items())
            )
            out.append(f"    rank {t.rank}: {srcs}" + (f"; {ms}" if ms else ""))
        return out


def summarize(
    rows: list[RankRow], real_source: str, metrics: Metrics | None = None, n_boot: int = 2000, seed: int = 0
) -> PromptRankSummary:
    """The figures above from current rank rows (every (group, rater) complete: the store guarantees it)."""
    if not rows:
        from histolab.errors import StudyError

        raise StudyError("no per-prompt ranks yet: nothing to analyse")
    rankings = sorted({(r.rater, r.group) for r in rows})
    n_images = max(r.rank for r in rows)
    sources = sorted({r.source for r in rows})
    out_sources = []
    for s in sources:
        mine = [r for r in rows if r.source == s]
        vals = [r.rank for r in mine]
        counts = {k: sum(v == k for v in vals) for k in range(1, n_images + 1)}
        ci = cluster_bootstrap_mean(vals, [r.group for r in mine], n_boot=n_boot, seed=seed)
        out_sources.append(SourceRank(s, len(vals), float(np.mean(vals)), ci, counts))
    out_sources.sort(key=lambda x: (x.mean_rank, x.source))
    k = sum(1 for r in rows if r.source == real_source and r.rank == 1)
    n = len(rankings)
    chance = 1.0 / n_images
    p = float(sstats.binomtest(k, n, chance).pvalue) if n else math.nan
    tiers = []
    for rank in range(1, n_images + 1):
        at = [r for r in rows if r.rank == rank]
        t = Tier(rank, len(at), {s: sum(r.source == s for r in at) for s in sorted({r.source for r in at})})
        if metrics is not None:
            t.set_metrics = _means(metrics.sets.get(r.source) for r in at)
            t.item_metrics = _means(_item(metrics, r.hashes) for r in at)
        tiers.append(t)
    return PromptRankSummary(
        n_images=n_images,
        groups=len({r.group for r in rows}),
        raters=len({r.rater for r in rows}),
        rankings=n,
        real_source=real_source,
        sources=out_sources,
        real_first=k,
        real_first_rate=k / n if n else math.nan,
        real_first_ci=binomial_ci(k, n),
        chance=chance,
        real_first_p=p,
        tiers=tiers,
    )


def _item(metrics: Metrics, hashes: tuple[str, ...]) -> dict[str, float] | None:
    for h in hashes:
        if h in metrics.items:
            return metrics.items[h]
    return None


def _means(tables) -> dict[str, dict[str, float]]:
    acc: dict[str, list[float]] = {}
    for t in tables:
        for m, v in (t or {}).items():
            if v is not None and math.isfinite(v):
                acc.setdefault(m, []).append(float(v))
    return {m: {"mean": float(np.mean(v)), "n": len(v)} for m, v in acc.items()}


def load_rows(store: Store, study_id: str) -> tuple[list[RankRow], str]:
    """The study's current per-prompt ranks and the name of its rated real source."""
    from histolab.errors import StudyError

    real = [
        r[0]
        for r in store.db.execute(
            "SELECT name FROM sources WHERE study_id = ? AND role = 'rated' AND kind = 'real'", [study_id]
        )
    ]
    if not store.db.execute("SELECT 1 FROM prompt_rank_groups WHERE study_id = ? LIMIT 1", [study_id]).fetchone():
        raise StudyError(f"study {study_id!r} has no per-prompt ranking (prompt_ranking: true in its config)")
    rows = [
        RankRow(rater, group, source, rank, (sha, psha))
        for rater, group, source, rank, sha, psha in store.db.execute(
            "SELECT p.rater_id, p.group_id, i.source, p.rank, i.sha256, i.pixel_sha256 FROM prompt_ranks p "
            "JOIN items i ON i.item_id = p.item_id WHERE p.study_id = ? AND p.current = 1 "
            "ORDER BY p.group_id, p.rater_id, p.rank",
            [study_id],
        )
    ]
    return rows, real[0]


def prompt_rank_summary(
    store: Store, study_id: str, metrics: Metrics | None = None, labels: dict[str, str] | None = None
) -> PromptRankSummary:
    """The study's summary; ``labels`` (source -> shown name) for a blinded view, e.g. the study's "Model A"."""
    rows, real = load_rows(store, study_id)
    if labels is not None:
        # Metrics are keyed by source name: resolve them before renaming.
        if metrics is not None:
            metrics = Metrics(items=metrics.items, sets={labels.get(k, k): v for k, v in metrics.sets.items()})
        rows = [RankRow(r.rater, r.group, labels.get(r.source, r.source), r.rank, r.hashes) for r in rows]
        real = labels.get(real, real)
    return summarize(rows, real, metrics)
