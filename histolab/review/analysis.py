"""Analysis of a study's current answers (revisions replace what they revise).

Results are keyed by source *name*; ``export`` and ``report`` swap names for
anonymous labels and leave out what would unblind when asked for a blinded
view. The methods:

- summaries per source and aspect (and "overall", a rater's mean over the
  aspects of one task): n, mean, SD, median and a 95% percentile bootstrap
  interval of the mean that resamples units (items or sets), 2000 resamples;
- agreement per aspect: Krippendorff's alpha (interval; all ratings, missing
  allowed) and ICC(2,1) / ICC(2,k) (two-way random, absolute agreement; on the
  units rated by every rater who rated the aspect) with F-based intervals;
- visual Turing test (truth: the source's kind): accuracy with a Wilson 95%
  interval and an exact binomial test against guessing, per-rater sensitivity
  (synthetic called synthetic) and specificity (real called real), and the
  share of each source called synthetic;
- artefact frequencies per source; rankings (mean rank, Kendall's W);
- Spearman correlations of expert scores with per-item and per-set metrics.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from histolab.review import stats
from histolab.review.metrics_file import Metrics
from histolab.review.store import Store
from histolab.review.study import StudyInfo, load_study

OVERALL = "overall"
N_BOOT = 2000  # resamples: the 2.5% / 97.5% quantiles are stable to about 0.01 of a scale point


@dataclass
class StudyData:
    info: StudyInfo
    raters: list[str]
    units: dict[int, dict[str, Any]]  # unit_id -> code, kind, source, class, sha256s, pixel_sha256s
    ratings: list[tuple[int, str, str, float]]  # unit, rater, aspect, value
    judgements: list[tuple[int, str, int, int]]  # unit, rater, says_synthetic, confidence
    marks: list[tuple[int, str, str, int]]  # unit, rater, artefact, present
    rankings: list[tuple[str, str, int]]  # rater, source, rank
    comments: list[tuple[int, str, str]]  # unit, rater, text
    times: list[tuple[int, str, int | None]]  # unit, rater, time_ms of the current answer

    @property
    def rated_sources(self) -> list[dict[str, Any]]:
        return [s for s in self.info.sources if s["role"] == "rated"]

    @property
    def kinds(self) -> dict[str, str]:
        return {s["name"]: s["kind"] for s in self.rated_sources}


def collect(store: Store, study_id: str) -> StudyData:
    info = load_study(store, study_id)
    db = store.db
    a = [study_id]
    units: dict[int, dict[str, Any]] = {}
    for r in db.query(
        """SELECT u.unit_id, u.code, u.kind, u.source, u.class,
                  GROUP_CONCAT(i.sha256, ' ') AS sha, GROUP_CONCAT(i.pixel_sha256, ' ') AS psha
           FROM units u LEFT JOIN unit_items ui ON ui.unit_id = u.unit_id LEFT JOIN items i ON i.item_id = ui.item_id
           WHERE u.study_id = ? GROUP BY u.unit_id ORDER BY u.code""",
        a,
    ):
        units[r["unit_id"]] = {
            "code": r["code"],
            "kind": r["kind"],
            "source": r["source"],
            "class": r["class"],
            "sha256": (r["sha"] or "").split(),
            "pixel_sha256": (r["psha"] or "").split(),
        }
    cur = "WHERE study_id = ? AND current = 1"
    return StudyData(
        info=info,
        raters=[
            r for (r,) in db.execute("SELECT rater_id FROM raters WHERE study_id = ? ORDER BY added_at, rater_id", a)
        ],
        units=units,
        ratings=[tuple(r) for r in db.execute(f"SELECT unit_id, rater_id, aspect, value FROM ratings {cur}", a)],
        judgements=[
            tuple(r)
            for r in db.execute(f"SELECT unit_id, rater_id, says_synthetic, confidence FROM judgements {cur}", a)
        ],
        marks=[
            tuple(r) for r in db.execute(f"SELECT unit_id, rater_id, artefact, present FROM artefact_marks {cur}", a)
        ],
        rankings=[tuple(r) for r in db.execute(f"SELECT rater_id, source, rank FROM rankings {cur}", a)],
        comments=[tuple(r) for r in db.execute(f"SELECT unit_id, rater_id, text FROM comments {cur}", a)],
        times=[
            tuple(r)
            for r in db.execute(
                """SELECT s.unit_id, s.rater_id, s.time_ms FROM submissions s
                   WHERE s.study_id = ? AND s.revision = (SELECT MAX(revision) FROM submissions t
                         WHERE t.study_id = s.study_id AND t.unit_id = s.unit_id AND t.rater_id = s.rater_id)""",
                a,
            )
        ],
    )


def _nan(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


@dataclass
class Summary:
    source: str
    aspect: str
    n_ratings: int
    n_units: int
    n_raters: int
    mean: float | None
    sd: float | None
    median: float | None
    ci_low: float | None
    ci_high: float | None


@dataclass
class Agreement:
    aspect: str
    n_units: int
    n_raters: int
    alpha_interval: float | None
    icc_units: int  # complete block the ICC used
    icc_raters: int
    icc_2_1: float | None
    icc_2_1_ci: tuple[float, float] | None
    icc_2_k: float | None
    icc_2_k_ci: tuple[float, float] | None


@dataclass
class Rate:
    k: int
    n: int
    value: float | None
    ci_low: float | None
    ci_high: float | None

    @classmethod
    def of(cls, k: int, n: int) -> Rate:
        lo, hi = stats.binomial_ci(k, n)
        return cls(k, n, k / n if n else None, _nan(lo), _nan(hi))


@dataclass
class TuringRater:
    rater: str
    accuracy: Rate
    sensitivity: Rate  # synthetic called synthetic
    specificity: Rate  # real called real
    mean_confidence: float | None


@dataclass
class Turing:
    accuracy: Rate
    p_vs_chance: float | None
    sensitivity: Rate
    specificity: Rate
    per_rater: list[TuringRater]
    called_synthetic: dict[str, Rate]  # source -> share of its judgements that said synthetic


@dataclass
class RankingSummary:
    n_raters: int
    mean_rank: dict[str, float]
    first_place: dict[str, int]
    kendall_w: float | None


@dataclass
class Correlation:
    level: str  # "item" or "set"
    metric: str
    target: str  # an aspect, "overall", "called synthetic" or "mean rank"
    n: int
    rho: float | None
    p: float | None


@dataclass
class Analysis:
    study_id: str
    mode: str
    raters: list[str]
    sources: list[dict[str, Any]]  # name, kind, label
    progress: dict[str, tuple[int, int]]
    summaries: list[Summary]
    agreement: list[Agreement]
    turing: Turing | None
    artefacts: dict[str, dict[str, Rate]]  # source -> artefact -> share of answers marking it
    ranking: RankingSummary | None
    correlations: list[Correlation] = field(default_factory=list)
    unmatched_metric_keys: list[str] = field(default_factory=list)
    median_time_ms: dict[str, float | None] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _per_task_scores(data: StudyData) -> dict[str, dict[tuple[int, str], float]]:
    """aspect (and "overall") -> (unit, rater) -> value."""
    out: dict[str, dict[tuple[int, str], float]] = {a.key: {} for a in data.info.aspects}
    for unit, rater, aspect, value in data.ratings:
        out.setdefault(aspect, {})[(unit, rater)] = value
    overall: dict[tuple[int, str], list[float]] = {}
    for d in out.values():
        for key, v in d.items():
            overall.setdefault(key, []).append(v)
    out[OVERALL] = {k: float(np.mean(v)) for k, v in overall.items()}
    return out


def _summaries(data: StudyData, scores, seed: int) -> list[Summary]:
    out = []
    for src in data.rated_sources:
        for aspect, d in scores.items():
            keys = [k for k in d if data.units[k[0]]["source"] == src["name"]]
            vals = [d[k] for k in keys]
            desc = stats.describe(vals)
            lo, hi = (
                stats.cluster_bootstrap_mean(vals, [k[0] for k in keys], n_boot=N_BOOT, seed=seed)
                if vals
                else (math.nan, math.nan)
            )
            out.append(
                Summary(
                    source=src["name"],
                    aspect=aspect,
                    n_ratings=desc["n"],
                    n_units=len({k[0] for k in keys}),
                    n_raters=len({k[1] for k in keys}),
                    mean=_nan(desc["mean"]),
                    sd=_nan(desc["sd"]),
                    median=_nan(desc["median"]),
                    ci_low=_nan(lo),
                    ci_high=_nan(hi),
                )
            )
    return out


def _agreement(data: StudyData, scores) -> list[Agreement]:
    out = []
    for aspect, d in scores.items():
        raters = sorted({r for _, r in d})
        units = sorted({u for u, _ in d})
        if not raters or not units:
            out.append(Agreement(aspect, 0, 0, None, 0, 0, None, None, None, None))
            continue
        m = np.full((len(raters), len(units)), np.nan)
        ri = {r: i for i, r in enumerate(raters)}
        ui = {u: j for j, u in enumerate(units)}
        for (u, r), v in d.items():
            m[ri[r], ui[u]] = v
        alpha = stats.krippendorff_alpha(m, "interval") if len(raters) >= 2 else math.nan
        complete = np.isfinite(m).all(axis=0)
        icc = None
        if len(raters) >= 2 and complete.sum() >= 2:
            block = m[:, complete].T
            if np.ptp(block) > 0:
                icc = stats.icc(block)
        out.append(
            Agreement(
                aspect=aspect,
                n_units=len(units),
                n_raters=len(raters),
                alpha_interval=_nan(alpha),
                icc_units=int(complete.sum()) if icc else 0,
                icc_raters=len(raters) if icc else 0,
                icc_2_1=_nan(icc.icc["ICC(2,1)"]) if icc else None,
                icc_2_1_ci=icc.ci["ICC(2,1)"] if icc else None,
                icc_2_k=_nan(icc.icc["ICC(2,k)"]) if icc else None,
                icc_2_k_ci=icc.ci["ICC(2,k)"] if icc else None,
            )
        )
    return out


def _turing(data: StudyData) -> Turing | None:
    if not data.info.turing_test or not data.judgements:
        return None
    kinds = data.kinds

    def tally(rows) -> tuple[Rate, Rate, Rate]:
        syn = [s for u, _, s, _ in rows if kinds[data.units[u]["source"]] == "generated"]
        real = [s for u, _, s, _ in rows if kinds[data.units[u]["source"]] == "real"]
        tp, tn = sum(syn), len(real) - sum(real)
        return Rate.of(tp + tn, len(syn) + len(real)), Rate.of(tp, len(syn)), Rate.of(tn, len(real))

    acc, sens, spec = tally(data.judgements)
    per_rater = []
    for r in data.raters:
        rows = [j for j in data.judgements if j[1] == r]
        if not rows:
            continue
        a, se, sp = tally(rows)
        per_rater.append(TuringRater(r, a, se, sp, float(np.mean([c for *_, c in rows]))))
    called = {}
    for src in data.rated_sources:
        rows = [s for u, _, s, _ in data.judgements if data.units[u]["source"] == src["name"]]
        called[src["name"]] = Rate.of(sum(rows), len(rows))
    return Turing(
        accuracy=acc,
        p_vs_chance=_nan(stats.binomial_p_vs_chance(acc.k, acc.n)),
        sensitivity=sens,
        specificity=spec,
        per_rater=per_rater,
        called_synthetic=called,
    )


def _artefacts(data: StudyData) -> dict[str, dict[str, Rate]]:
    out: dict[str, dict[str, Rate]] = {}
    for src in data.rated_sources:
        per = {}
        for a in data.info.artefacts:
            rows = [p for u, _, k, p in data.marks if k == a.key and data.units[u]["source"] == src["name"]]
            per[a.key] = Rate.of(sum(rows), len(rows))
        out[src["name"]] = per
    return out


def _ranking(data: StudyData) -> RankingSummary | None:
    if not data.rankings:
        return None
    sources = [s["name"] for s in data.rated_sources]
    by_rater: dict[str, dict[str, int]] = {}
    for r, s, k in data.rankings:
        by_rater.setdefault(r, {})[s] = k
    full = [d for d in by_rater.values() if set(d) == set(sources)]
    if not full:
        return None
    ranks = np.array([[d[s] for s in sources] for d in full], dtype=float)
    return RankingSummary(
        n_raters=len(full),
        mean_rank={s: float(ranks[:, i].mean()) for i, s in enumerate(sources)},
        first_place={s: int((ranks[:, i] == 1).sum()) for i, s in enumerate(sources)},
        kendall_w=_nan(stats.kendall_w(ranks)) if len(full) >= 2 else None,
    )


def _correlations(data: StudyData, scores, turing: Turing | None, ranking: RankingSummary | None, metrics: Metrics):
    out: list[Correlation] = []
    matched: set[str] = set()
    # Per item: the raters' mean for each unit holding one image (item studies).
    if data.info.mode == "item" and metrics.items:
        unit_metric: dict[str, dict[int, float]] = {}
        for uid, u in data.units.items():
            if u["kind"] != "item":
                continue
            for key in (*u["sha256"], *u["pixel_sha256"]):
                if key in metrics.items:
                    matched.add(key)
                    for name, v in metrics.items[key].items():
                        unit_metric.setdefault(name, {})[uid] = v
        targets: dict[str, dict[int, float]] = {}
        for aspect, d in scores.items():
            acc: dict[int, list[float]] = {}
            for (u, _), v in d.items():
                acc.setdefault(u, []).append(v)
            # Rounded so that float noise never breaks a tie the ranks should keep.
            targets[aspect] = {u: round(float(np.mean(v)), 9) for u, v in acc.items()}
        if turing is not None:
            acc2: dict[int, list[int]] = {}
            for u, _, s, _ in data.judgements:
                acc2.setdefault(u, []).append(s)
            targets["called synthetic"] = {u: float(np.mean(v)) for u, v in acc2.items()}
        for name, um in sorted(unit_metric.items()):
            for target, tv in targets.items():
                common = sorted(set(um) & set(tv))
                rho, p, n = stats.spearman([um[u] for u in common], [tv[u] for u in common])
                out.append(Correlation("item", name, target, n, _nan(rho), _nan(p)))
    # Per set (source): the mean over all its ratings, and its mean rank.
    sources = [s["name"] for s in data.rated_sources]
    set_metrics = {s: metrics.sets[s] for s in sources if s in metrics.sets}
    matched.update(set_metrics)
    if set_metrics:
        targets_s: dict[str, dict[str, float]] = {}
        for aspect, d in scores.items():
            for s in sources:
                vals = [v for (u, _), v in d.items() if data.units[u]["source"] == s]
                if vals:
                    targets_s.setdefault(aspect, {})[s] = float(np.mean(vals))
        if ranking is not None:
            targets_s["mean rank"] = dict(ranking.mean_rank)
        names = sorted({n for d in set_metrics.values() for n in d})
        for name in names:
            for target, tv in targets_s.items():
                common = [s for s in sources if s in tv and name in set_metrics.get(s, {})]
                rho, p, n = stats.spearman([set_metrics[s][name] for s in common], [tv[s] for s in common])
                out.append(Correlation("set", name, target, n, _nan(rho), _nan(p)))
    unmatched = sorted((set(metrics.items) | set(metrics.sets)) - matched)
    return out, unmatched


def analyse(store: Store, study_id: str, metrics: Metrics | None = None, seed: int = 0) -> Analysis:
    data = collect(store, study_id)
    scores = _per_task_scores(data)
    turing = _turing(data)
    ranking = _ranking(data)
    correlations, unmatched = _correlations(data, scores, turing, ranking, metrics) if metrics else ([], [])
    prog = {}
    for r in data.raters:
        total, done = store.db.execute(
            "SELECT COUNT(*), COALESCE(SUM(done_at IS NOT NULL), 0) FROM assignments WHERE study_id = ? AND rater_id = ?",
            [study_id, r],
        ).fetchone()
        prog[r] = (int(done), int(total))
    times: dict[str, list[int]] = {}
    for _, r, t in data.times:
        if t is not None:
            times.setdefault(r, []).append(t)
    return Analysis(
        study_id=study_id,
        mode=data.info.mode,
        raters=list(data.raters),
        sources=[{"name": s["name"], "kind": s["kind"], "label": s["label"]} for s in data.rated_sources],
        progress=prog,
        summaries=_summaries(data, scores, seed),
        agreement=_agreement(data, scores),
        turing=turing,
        artefacts=_artefacts(data),
        ranking=ranking,
        correlations=correlations,
        unmatched_metric_keys=unmatched,
        median_time_ms={r: float(np.median(times[r])) if r in times else None for r in data.raters},
    )
