"""Statistics for expert studies: agreement, intervals, concordance. Pure numpy/scipy.

- ``krippendorff_alpha``: Krippendorff (2011), "Computing Krippendorff's
  Alpha-Reliability", with the coincidence matrix, for nominal, ordinal,
  interval and ratio data and any pattern of missing values.
- ``icc``: Shrout & Fleiss (1979) single and average measures, with the
  F-based 95% intervals of Shrout & Fleiss / McGraw & Wong (1996) (the ones R's
  ``psych::ICC`` prints). The study reports ICC(2,1) and ICC(2,k): two-way
  random effects (raters are a sample of pathologists), absolute agreement.
- ``cluster_bootstrap_mean``: a percentile interval for a mean of ratings
  that resamples whole units (items or sets), since one unit's ratings by
  several raters are not independent.
- ``binomial_ci``: Wilson score interval (or Clopper-Pearson), from scipy.
- ``kendall_w``: concordance of several raters' rankings, with the tie correction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

LEVELS = ("nominal", "ordinal", "interval", "ratio")


def krippendorff_alpha(data, level: str = "interval") -> float:
    """Alpha for a raters x units array (NaN: missing). NaN when no unit has two values."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    x = np.asarray(data, dtype=float)
    if x.ndim != 2:
        raise ValueError(f"expected a raters x units matrix, got shape {x.shape}")
    values = np.unique(x[np.isfinite(x)])
    if values.size == 0:
        return float("nan")
    index = {v: i for i, v in enumerate(values)}
    o = np.zeros((values.size, values.size))
    for u in range(x.shape[1]):
        col = x[:, u]
        col = col[np.isfinite(col)]
        m = col.size
        if m < 2:
            continue  # an unpairable unit adds nothing
        counts = np.zeros(values.size)
        for v in col:
            counts[index[v]] += 1
        # Ordered pairs of distinct raters within the unit: n_c * n_k, minus self-pairs on the diagonal.
        o += (np.outer(counts, counts) - np.diag(counts)) / (m - 1)
    n_c = o.sum(axis=1)
    n = n_c.sum()
    if n <= 1:
        return float("nan")
    delta = _delta(values, n_c, level)
    d_o = (o * delta).sum()
    d_e = (np.outer(n_c, n_c) * delta).sum() / (n - 1)
    if d_e == 0:
        return float("nan")  # every value the same: agreement is undefined, not perfect
    return float(1.0 - d_o / d_e)


def _delta(values: np.ndarray, n_c: np.ndarray, level: str) -> np.ndarray:
    c, k = np.meshgrid(values, values, indexing="ij")
    if level == "nominal":
        return (c != k).astype(float)
    if level == "interval":
        return (c - k) ** 2
    if level == "ratio":
        with np.errstate(invalid="ignore", divide="ignore"):
            d = ((c - k) / (c + k)) ** 2
        return np.nan_to_num(d)
    # ordinal: (sum of n_g from c to k, minus half of n_c and n_k) squared
    cum = np.concatenate([[0.0], np.cumsum(n_c)])
    i, j = np.meshgrid(np.arange(values.size), np.arange(values.size), indexing="ij")
    lo, hi = np.minimum(i, j), np.maximum(i, j)
    between = cum[hi + 1] - cum[lo]
    return (between - (n_c[i] + n_c[j]) / 2) ** 2


@dataclass(frozen=True)
class ICCResult:
    """Shrout & Fleiss ICC(form, 1) and ICC(form, k), with 95% intervals."""

    n_targets: int
    n_raters: int
    icc: dict[str, float]  # "ICC(1,1)", "ICC(2,1)", "ICC(3,1)", "ICC(1,k)", "ICC(2,k)", "ICC(3,k)"
    ci: dict[str, tuple[float, float]]


def icc(matrix, confidence: float = 0.95) -> ICCResult:
    """ICCs of a complete targets x raters matrix (rows: items, columns: raters)."""
    y = np.asarray(matrix, dtype=float)
    if y.ndim != 2 or y.shape[0] < 2 or y.shape[1] < 2 or not np.isfinite(y).all():
        raise ValueError(f"ICC needs a complete targets x raters matrix with at least 2 x 2 values, got {y.shape}")
    n, k = y.shape
    grand = y.mean()
    ss_rows = k * ((y.mean(axis=1) - grand) ** 2).sum()
    ss_cols = n * ((y.mean(axis=0) - grand) ** 2).sum()
    ss_total = ((y - grand) ** 2).sum()
    ss_err = ss_total - ss_rows - ss_cols
    bms = ss_rows / (n - 1)
    jms = ss_cols / (k - 1)
    ems = ss_err / ((n - 1) * (k - 1))
    wms = (ss_total - ss_rows) / (n * (k - 1))
    v = {
        "ICC(1,1)": _div(bms - wms, bms + (k - 1) * wms),
        "ICC(2,1)": _div(bms - ems, bms + (k - 1) * ems + k * (jms - ems) / n),
        "ICC(3,1)": _div(bms - ems, bms + (k - 1) * ems),
        "ICC(1,k)": _div(bms - wms, bms),
        "ICC(2,k)": _div(bms - ems, bms + (jms - ems) / n),
        "ICC(3,k)": _div(bms - ems, bms),
    }
    a = 1 - confidence
    ci: dict[str, tuple[float, float]] = {}
    # One-way (form 1) and two-way mixed (form 3): exact F intervals.
    for form, f_obs, df2 in (("1", _div(bms, wms), n * (k - 1)), ("3", _div(bms, ems), (n - 1) * (k - 1))):
        fl = f_obs / stats.f.ppf(1 - a / 2, n - 1, df2)
        fu = f_obs * stats.f.ppf(1 - a / 2, df2, n - 1)
        ci[f"ICC({form},1)"] = ((fl - 1) / (fl + k - 1), (fu - 1) / (fu + k - 1))
        ci[f"ICC({form},k)"] = (1 - 1 / fl, 1 - 1 / fu)
    # Two-way random (form 2): Satterthwaite's approximate df (McGraw & Wong 1996, case 2A).
    r = v["ICC(2,1)"]
    fj = _div(jms, ems)
    vn = (k - 1) * (n - 1) * (k * r * fj + n * (1 + (k - 1) * r) - k * r) ** 2
    vd = (n - 1) * k**2 * r**2 * fj**2 + (n * (1 + (k - 1) * r) - k * r) ** 2
    df = _div(vn, vd)
    fu_ = stats.f.ppf(1 - a / 2, n - 1, df)
    fl_ = stats.f.ppf(1 - a / 2, df, n - 1)
    lo = n * (bms - fu_ * ems) / (fu_ * (k * jms + (k * n - k - n) * ems) + n * bms)
    hi = n * (fl_ * bms - ems) / (k * jms + (k * n - k - n) * ems + n * fl_ * bms)
    ci["ICC(2,1)"] = (float(lo), float(hi))
    ci["ICC(2,k)"] = (float(lo * k / (1 + lo * (k - 1))), float(hi * k / (1 + hi * (k - 1))))
    return ICCResult(
        n_targets=n,
        n_raters=k,
        icc={kk: float(x) for kk, x in v.items()},
        ci={kk: (float(p), float(q)) for kk, (p, q) in ci.items()},
    )


def _div(a: float, b: float) -> float:
    return float(a / b) if b != 0 else float("nan")


def cluster_bootstrap_mean(
    values, clusters, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile interval of the mean of ``values``, resampling whole clusters with replacement."""
    v = np.asarray(values, dtype=float)
    c = np.asarray(clusters)
    ids, inv = np.unique(c, return_inverse=True)
    if ids.size < 2:
        return (float("nan"), float("nan"))
    sums = np.bincount(inv, weights=v, minlength=ids.size)
    counts = np.bincount(inv, minlength=ids.size).astype(float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, ids.size, size=(n_boot, ids.size))
    means = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    a = (1 - confidence) / 2
    return (float(np.quantile(means, a)), float(np.quantile(means, 1 - a)))


def binomial_ci(k: int, n: int, confidence: float = 0.95, method: str = "wilson") -> tuple[float, float]:
    """Interval for a proportion k/n: "wilson" (default) or "exact" (Clopper-Pearson)."""
    if n == 0:
        return (float("nan"), float("nan"))
    ci = stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method=method)
    return (float(ci.low), float(ci.high))


def binomial_p_vs_chance(k: int, n: int) -> float:
    """Two-sided exact binomial test of k/n against 0.5 (guessing)."""
    return float(stats.binomtest(int(k), int(n), 0.5).pvalue) if n else float("nan")


def kendall_w(ranks) -> float:
    """Kendall's W for an m raters x n objects array of ranks (1 = best), tie-corrected."""
    r = np.asarray(ranks, dtype=float)
    m, n = r.shape
    if m < 2 or n < 2:
        return float("nan")
    rr = np.vstack([stats.rankdata(row) for row in r])  # re-rank: ties get mid-ranks
    totals = rr.sum(axis=0)
    s = ((totals - totals.mean()) ** 2).sum()
    ties = sum(
        ((np.unique(row, return_counts=True)[1] ** 3) - np.unique(row, return_counts=True)[1]).sum() for row in rr
    )
    denom = m**2 * (n**3 - n) - m * ties
    return float(12 * s / denom) if denom else float("nan")


def spearman(x, y) -> tuple[float, float, int]:
    """(rho, two-sided p, n) over the pairs where both are finite; NaN below 3 pairs or without spread."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    n = int(a.size)
    if n < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return (float("nan"), float("nan"), n)
    res = stats.spearmanr(a, b)
    return (float(res.statistic), float(res.pvalue), n)


def describe(values) -> dict[str, float]:
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return {"n": 0, "mean": math.nan, "sd": math.nan, "median": math.nan}
    return {
        "n": int(v.size),
        "mean": float(v.mean()),
        "sd": float(v.std(ddof=1)) if v.size > 1 else math.nan,
        "median": float(np.median(v)),
    }
