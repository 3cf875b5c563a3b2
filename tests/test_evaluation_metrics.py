"""The metrics on features: closed forms, and agreement with torch-fidelity 0.4.0 and torchmetrics 1.9.0."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg

from histolab.evaluation import metrics
from histolab.evaluation.stats import CosineGram, RunningStats

REL = 1e-3  # the agreement bar; the observed differences are far smaller


def _features(seed: int, n: int, d: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, d)) / np.sqrt(d)
    # Non-negative, correlated, like pooled ReLU features.
    return np.abs(rng.normal(size=(n, d)) @ a + shift).astype(np.float32)


def _stats(x) -> RunningStats:
    st = RunningStats(x.shape[1])
    st.update(x)
    return st


class _Identity(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.num_features = d

    def forward(self, x):
        return x


def test_fid_of_identical_sets_is_zero():
    x = _features(0, 300, 64)
    st = _stats(x)
    assert metrics.frechet_distance(st.mean, st.cov, st.mean, st.cov) == pytest.approx(0.0, abs=1e-9)


def test_fid_closed_form_for_known_gaussians():
    rng = np.random.default_rng(1)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    # Diagonal covariances: FD = |mu1 - mu2|^2 + sum (s1 - s2)^2 with s the standard deviations.
    s1, s2 = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    expected = float(((mu1 - mu2) ** 2).sum() + ((s1 - s2) ** 2).sum())
    got = metrics.frechet_distance(mu1, np.diag(s1**2), mu2, np.diag(s2**2))
    assert got == pytest.approx(expected, rel=1e-10)
    # General covariances: against scipy's matrix square root.
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    c1, c2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * np.trace(linalg.sqrtm(c1 @ c2).real)
    assert metrics.frechet_distance(mu1, c1, mu2, c2) == pytest.approx(ref, rel=1e-9)


def test_fid_estimated_from_gaussian_samples_matches_the_closed_form():
    rng = np.random.default_rng(2)
    d, n = 4, 200_000
    mu1, mu2 = np.zeros(d), np.array([1.0, -0.5, 0.25, 0.0])
    s1, s2 = np.array([1.0, 2.0, 0.5, 1.0]), np.array([1.5, 1.0, 0.5, 3.0])
    expected = float(((mu1 - mu2) ** 2).sum() + ((s1 - s2) ** 2).sum())
    a = _stats(mu1 + rng.normal(size=(n, d)) * s1)
    b = _stats(mu2 + rng.normal(size=(n, d)) * s2)
    assert metrics.frechet_distance(a.mean, a.cov, b.mean, b.cov) == pytest.approx(expected, rel=0.01)


def test_running_stats_match_numpy_and_do_not_depend_on_batch_size():
    x = _features(3, 1100, 32, shift=5.0).astype(np.float64)  # more rows than FLUSH_ROWS: buffered adds
    ref_mean, ref_cov = x.mean(0), np.cov(x, rowvar=False)
    for bs in (1, 7, 64, 1100):
        st = RunningStats(32)
        for s in range(0, len(x), bs):
            st.update(x[s : s + bs])
        np.testing.assert_allclose(st.mean, ref_mean, rtol=1e-12)
        np.testing.assert_allclose(st.cov, ref_cov, rtol=1e-9, atol=1e-12)


def test_fid_agrees_with_torch_fidelity_and_torchmetrics():
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = _features(4, 600, 128), _features(5, 500, 128, shift=0.3)
    a, b = _stats(real), _stats(fake)
    ours = metrics.frechet_distance(a.mean, a.cov, b.mean, b.cov)
    s1 = fid_features_to_statistics(torch.from_numpy(real))
    s2 = fid_features_to_statistics(torch.from_numpy(fake))
    tf = fid_statistics_to_metric(s1, s2, verbose=False)["frechet_inception_distance"]
    tm = FrechetInceptionDistance(feature=_Identity(128))
    tm.update(torch.from_numpy(real).double(), real=True)
    tm.update(torch.from_numpy(fake).double(), real=False)
    assert ours > 1.0
    assert ours == pytest.approx(tf, rel=REL)
    assert ours == pytest.approx(float(tm.compute()), rel=REL)


def test_kid_agrees_with_torch_fidelity_subset_for_subset():
    from torch_fidelity.metric_kid import kid_features_to_metric

    real, fake = _features(6, 400, 64), _features(7, 350, 64, shift=0.2)
    ours = metrics.kid(real, fake, subsets=20, subset_size=100, seed=11)
    ref = kid_features_to_metric(
        torch.from_numpy(real),
        torch.from_numpy(fake),
        kid_subsets=20,
        kid_subset_size=100,
        rng_seed=11,
        kid_kernel="poly",
        kid_kernel_poly_degree=3,
        kid_kernel_poly_gamma=None,
        kid_kernel_poly_coef0=1,
        verbose=False,
    )
    assert ours["kid_mean"] > 0
    assert ours["kid_mean"] == pytest.approx(ref["kernel_inception_distance_mean"], rel=REL)
    assert ours["kid_std"] == pytest.approx(ref["kernel_inception_distance_std"], rel=REL)


def test_kid_agrees_with_torchmetrics_on_the_whole_sets():
    from torchmetrics.image.kid import KernelInceptionDistance, poly_mmd

    real, fake = _features(8, 200, 48), _features(9, 200, 48, shift=0.2)
    ours = metrics.polynomial_mmd2(real, fake)
    assert ours == pytest.approx(
        float(poly_mmd(torch.from_numpy(real).double(), torch.from_numpy(fake).double())), rel=REL
    )
    # The metric class too: one subset of every image is a permutation, which MMD does not see.
    tm = KernelInceptionDistance(feature=_Identity(48), subsets=1, subset_size=200)
    tm.update(torch.from_numpy(real).double(), real=True)
    tm.update(torch.from_numpy(fake).double(), real=False)
    assert ours == pytest.approx(float(tm.compute()[0]), rel=REL)


def test_kid_of_small_sets_uses_half_the_smaller_set():
    real, fake = _features(10, 30, 8), _features(11, 40, 8)
    res = metrics.kid(real, fake, subsets=10, subset_size=1000)
    assert res["kid_subset_size"] == 15
    assert res["kid_std"] > 0  # subsets differ, so the spread is informative


def test_precision_recall_agrees_with_torch_fidelity():
    from torch_fidelity.metric_prc import prc_features_to_metric

    real, fake = _features(12, 300, 32), _features(13, 250, 32, shift=0.4)
    ours = metrics.precision_recall(real, fake, k=3, block=64)
    # torch-fidelity's input 1 is the generated set, input 2 the real one.
    ref = prc_features_to_metric(
        torch.from_numpy(fake),
        torch.from_numpy(real),
        prc_neighborhood=3,
        prc_batch_size=10000,
        save_cpu_ram=False,
        verbose=False,
    )
    assert 0 < ours["precision"] < 1 and 0 < ours["recall"] < 1
    assert ours["precision"] == pytest.approx(ref["precision"], rel=REL)
    assert ours["recall"] == pytest.approx(ref["recall"], rel=REL)


def test_precision_recall_of_disjoint_sets_is_zero_and_of_identical_sets_one():
    x = _features(14, 100, 16)
    assert metrics.precision_recall(x, x) == {"precision": 1.0, "recall": 1.0}
    assert metrics.precision_recall(x, x + 1000.0) == {"precision": 0.0, "recall": 0.0}


def test_inception_score_agrees_with_torch_fidelity():
    from torch_fidelity.metric_isc import isc_features_to_metric

    logits = np.random.default_rng(15).normal(size=(500, 1008)) * 3
    ours = metrics.inception_score(logits, splits=10)
    ref = isc_features_to_metric(torch.from_numpy(logits), splits=10, shuffle=False)
    assert ours["inception_score_mean"] > 1.5
    assert ours["inception_score_mean"] == pytest.approx(ref["inception_score_mean"], rel=1e-9)
    assert ours["inception_score_std"] == pytest.approx(ref["inception_score_std"], rel=1e-6)


def test_inception_score_bounds():
    # Confident and uniformly spread over 10 classes -> IS = 10; all the same class -> 1.
    logits = np.full((1000, 1008), -50.0)
    logits[np.arange(1000), np.arange(1000) % 10] = 50.0
    assert metrics.inception_score(logits, splits=1)["inception_score_mean"] == pytest.approx(10.0, rel=1e-6)
    same = np.zeros((100, 1008))
    same[:, 3] = 50
    assert metrics.inception_score(same, splits=10)["inception_score_mean"] == pytest.approx(1.0, rel=1e-6)


def test_vendi_score_closed_forms_and_streamed_gram():
    x = _features(16, 120, 24)
    assert metrics.vendi_score(np.repeat(x[:1], 50, axis=0)) == pytest.approx(1.0, rel=1e-9)
    assert metrics.vendi_score(np.eye(7) * 3.0) == pytest.approx(7.0, rel=1e-9)
    # Against the definition: eigenvalues of the n x n cosine kernel / n.
    x64 = x.astype(np.float64)
    u = x64 / np.linalg.norm(x64, axis=1, keepdims=True)
    ev = np.linalg.eigvalsh(u @ u.T / len(u))
    ev = ev[ev > 1e-12]
    direct = float(np.exp(-(ev * np.log(ev)).sum()))
    g = CosineGram(24)
    for s in range(0, 120, 13):
        g.update(x[s : s + 13])
    assert metrics.vendi_from_gram(g.g, g.n) == pytest.approx(direct, rel=1e-9)
    # Fewer vectors than dimensions: vendi_score decomposes the n x n kernel, the streamed gram the d x d one.
    few = _features(17, 9, 40)
    g = CosineGram(40)
    g.update(few)
    assert metrics.vendi_score(few) == pytest.approx(metrics.vendi_from_gram(g.g, g.n), rel=1e-9)


def test_nearest_neighbours_finds_the_copy():
    ref = _features(17, 50, 16)
    query = ref[[3, 10, 42]] * 2.0  # scaled copies: cosine distance 0
    idx, dist = metrics.nearest_neighbours(query, ref)
    assert idx.tolist() == [3, 10, 42]
    np.testing.assert_allclose(dist, 0.0, atol=1e-9)


@pytest.mark.parametrize(("n1", "n2", "d"), [(12, 9, 256), (300, 200, 64)])
def test_fid_from_rows_equals_fid_from_covariances_and_torch_fidelity(n1, n2, d):
    # The rows path (an n1 x n2 SVD) is the same maths as the covariance path, for fewer images than
    # dimensions (rank-deficient covariances, where validation runs) and for more.
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    real, fake = _features(6, n1, d), _features(7, n2, d, shift=0.2)
    a, b = _stats(real), _stats(fake)
    rows = metrics.frechet_distance_of_features(real, fake)
    assert rows > 0.1
    # 1e-6: the eigen path sums square roots of rounding-level eigenvalues of the singular covariances
    assert rows == pytest.approx(metrics.frechet_distance(a.mean, a.cov, b.mean, b.cov), rel=1e-6)
    s1 = fid_features_to_statistics(torch.from_numpy(real))
    s2 = fid_features_to_statistics(torch.from_numpy(fake))
    assert rows == pytest.approx(fid_statistics_to_metric(s1, s2, verbose=False)["frechet_inception_distance"], rel=REL)
    assert metrics.frechet_distance_of_features(real, real) == pytest.approx(0.0, abs=1e-9)
