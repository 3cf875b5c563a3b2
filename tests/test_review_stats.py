"""Agreement and interval statistics against published worked examples."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from histolab.review import stats

nan = math.nan

# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", section C:
# four observers, twelve units, missing values. Published: nominal .743,
# ordinal .815, interval .849, ratio .797.
KRIPP = np.array(
    [
        [1, 2, 3, 3, 2, 1, 4, 1, 2, nan, nan, nan],
        [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, nan, 3],
        [nan, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, nan],
        [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, nan],
    ]
)

# Shrout & Fleiss (1979), Table 2: six targets rated by four judges.
SHROUT_FLEISS = np.array([[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]])


@pytest.mark.parametrize(
    ("level", "published"), [("nominal", 0.743), ("ordinal", 0.815), ("interval", 0.849), ("ratio", 0.797)]
)
def test_krippendorff_reliability_data_example(level, published):
    assert stats.krippendorff_alpha(KRIPP, level) == pytest.approx(published, abs=0.0005)


def test_krippendorff_binary_example():
    # Same paper, section A: two observers, ten units, binary data; alpha = 0.095.
    data = [[0, 1, 0, 0, 0, 0, 0, 0, 1, 0], [1, 1, 1, 0, 0, 1, 0, 0, 0, 0]]
    assert stats.krippendorff_alpha(data, "nominal") == pytest.approx(0.095, abs=0.0005)


def test_krippendorff_properties():
    perfect = np.array([[1, 5, 7, 2], [1, 5, 7, 2], [1, 5, 7, nan]])
    assert stats.krippendorff_alpha(perfect) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    cols = rng.permutation(KRIPP.shape[1])
    assert stats.krippendorff_alpha(KRIPP[:, cols]) == pytest.approx(0.849, abs=0.0005)
    # Interval alpha is invariant to a linear change of the scale.
    assert stats.krippendorff_alpha(KRIPP * 2 + 3) == pytest.approx(0.849, abs=0.0005)
    assert math.isnan(stats.krippendorff_alpha([[3, 3], [3, 3]]))  # no variation: undefined, not perfect


# Shrout & Fleiss (1979), Table 4 (published to two decimals).
SF_TABLE4 = {"ICC(1,1)": 0.17, "ICC(2,1)": 0.29, "ICC(3,1)": 0.71, "ICC(1,k)": 0.44, "ICC(2,k)": 0.62, "ICC(3,k)": 0.91}
# The 95% intervals R's psych::ICC prints for the same data (Revelle's documentation
# of ICC reproduces this example): F-based, McGraw & Wong for form 2.
PSYCH_CI = {
    "ICC(1,1)": (-0.133, 0.72),
    "ICC(2,1)": (0.019, 0.76),
    "ICC(3,1)": (0.342, 0.95),
    "ICC(1,k)": (-0.884, 0.91),
    "ICC(2,k)": (0.071, 0.93),
    "ICC(3,k)": (0.676, 0.99),
}


def test_icc_shrout_fleiss_table():
    res = stats.icc(SHROUT_FLEISS)
    assert (res.n_targets, res.n_raters) == (6, 4)
    for form, published in SF_TABLE4.items():
        assert round(res.icc[form], 2) == published, form
    for form, (lo, hi) in PSYCH_CI.items():
        assert res.ci[form][0] == pytest.approx(lo, abs=0.0015), form
        assert res.ci[form][1] == pytest.approx(hi, abs=0.006), form


def test_icc_needs_a_complete_matrix():
    with pytest.raises(ValueError, match="complete"):
        stats.icc([[1, nan], [2, 3]])


def test_wilson_interval_matches_its_formula():
    k, n, z = 37, 52, sps.norm.ppf(0.975)
    p = k / n
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / (1 + z**2 / n)
    lo, hi = stats.binomial_ci(k, n)
    assert lo == pytest.approx(centre - half, abs=1e-9)
    assert hi == pytest.approx(centre + half, abs=1e-9)


def test_clopper_pearson_interval_matches_beta_quantiles():
    k, n = 8, 10
    lo, hi = stats.binomial_ci(k, n, method="exact")
    assert lo == pytest.approx(sps.beta.ppf(0.025, k, n - k + 1), abs=1e-9)
    assert hi == pytest.approx(sps.beta.ppf(0.975, k + 1, n - k), abs=1e-9)
    assert all(math.isnan(x) for x in stats.binomial_ci(0, 0))


def test_kendall_w_equals_its_mean_spearman_identity():
    rng = np.random.default_rng(1)
    ranks = np.array([rng.permutation(6) + 1 for _ in range(5)])
    m = ranks.shape[0]
    rhos = [sps.spearmanr(ranks[i], ranks[j]).statistic for i in range(m) for j in range(i + 1, m)]
    # W = ((m - 1) * mean pairwise rho + 1) / m, an identity for untied ranks.
    assert stats.kendall_w(ranks) == pytest.approx(((m - 1) * np.mean(rhos) + 1) / m)
    assert stats.kendall_w([[1, 2, 3], [1, 2, 3]]) == pytest.approx(1.0)
    assert stats.kendall_w([[1, 2, 3], [3, 2, 1]]) == pytest.approx(0.0)


def test_cluster_bootstrap_counts_clusters_not_ratings():
    rng = np.random.default_rng(2)
    x = rng.normal(0, 1, 400)
    lo, hi = stats.cluster_bootstrap_mean(x, np.arange(400), seed=0)
    half = (hi - lo) / 2
    assert lo < x.mean() < hi
    assert half == pytest.approx(1.96 / 20, rel=0.2)  # the normal interval for n = 400
    # Each value rated 5 times (identically) by 5 raters: still 400 independent units, not 2000.
    rep = np.repeat(x, 5)
    lo5, hi5 = stats.cluster_bootstrap_mean(rep, np.repeat(np.arange(400), 5), seed=0)
    assert (hi5 - lo5) / 2 == pytest.approx(half, rel=0.1)


def test_spearman_needs_three_pairs():
    rho, _p, n = stats.spearman([1, 2], [3, 4])
    assert n == 2 and math.isnan(rho)
    rho, _p, n = stats.spearman([1, 2, 3, nan], [1, 3, 9, 4])
    assert (n, rho) == (3, pytest.approx(1.0))
