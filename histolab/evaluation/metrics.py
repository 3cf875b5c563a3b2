"""The metrics, on features (numpy arrays), apart from any network.

Each follows its paper and the reference implementations the tests compare
against (torch-fidelity 0.4.0, torchmetrics 1.9.0):

* Fréchet distance (FID in Inception space; Heusel et al. 2017).
* KID: unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y/d + 1)^3,
  averaged over random subsets (Bińkowski et al. 2018); mean and std over subsets.
* Improved precision and recall: k-NN manifolds with k = 3 (Kynkäänniemi et al. 2019).
* Inception Score: exp(E KL(p(y|x) || p(y))) over 10 splits (Salimans et al. 2016).
* Vendi score: exp of the entropy of the eigenvalues of K/n, K the cosine kernel
  (Friedman and Dieng 2023).
"""

from __future__ import annotations

import math

import numpy as np


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """||mu1 - mu2||^2 + Tr(C1) + Tr(C2) - 2 Tr((C1 C2)^1/2), all in float64.

    Tr((C1 C2)^1/2) is the sum of square roots of the eigenvalues of the
    symmetric PSD matrix C1^1/2 C2 C1^1/2 (same spectrum as C1 C2), which
    needs no complex arithmetic and stays accurate for singular covariances
    (fewer images than dimensions).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    w, v = np.linalg.eigh(cov1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ cov2 @ root1
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(ev, 0, None)).sum())
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_covmean)
    return max(value, 0.0)  # a true distance: tiny negatives are rounding


def frechet_distance_of_features(x: np.ndarray, y: np.ndarray) -> float:
    """frechet_distance of two sets of feature rows, the same number exactly, without d x d matrices.

    With A and B the centred rows, C1 = A'A/(n1-1) and C2 = B'B/(n2-1), the non-zero eigenvalues of
    C1 C2 are those of (A B')(A B')' / ((n1-1)(n2-1)), so Tr((C1 C2)^1/2) is the sum of the singular
    values of A B' divided by sqrt((n1-1)(n2-1)). For sets smaller than the dimension (every per-epoch
    validation, every smoke run) that is an n1 x n2 SVD instead of two 2048 x 2048 eigendecompositions.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if min(len(x), len(y)) < 2:
        raise ValueError(f"FID needs at least 2 vectors per set, got {len(x)} and {len(y)}")
    mu1, mu2 = x.mean(axis=0), y.mean(axis=0)
    a, b = x - mu1, y - mu2
    c1, c2 = len(x) - 1, len(y) - 1
    tr_covmean = float(np.linalg.svd(a @ b.T, compute_uv=False).sum()) / math.sqrt(c1 * c2)
    diff = mu1 - mu2
    value = float(diff @ diff + (a * a).sum() / c1 + (b * b).sum() / c2 - 2.0 * tr_covmean)
    return max(value, 0.0)


def polynomial_mmd2(
    x: np.ndarray, y: np.ndarray, degree: int = 3, gamma: float | None = None, coef0: float = 1.0
) -> float:
    """Unbiased MMD^2 between two equal-size samples with the polynomial kernel (KID's estimator)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    m = len(x)
    if len(y) != m or m < 2:
        raise ValueError(f"KID subsets must have the same size >= 2, got {len(x)} and {len(y)}")
    g = 1.0 / x.shape[1] if gamma is None else gamma
    kxx = (x @ x.T * g + coef0) ** degree
    kyy = (y @ y.T * g + coef0) ** degree
    kxy = (x @ y.T * g + coef0) ** degree
    sxx = kxx.sum() - np.trace(kxx)
    syy = kyy.sum() - np.trace(kyy)
    return float((sxx + syy) / (m * (m - 1)) - 2.0 * kxy.sum() / (m * m))


def kid(real: np.ndarray, fake: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> dict:
    """KID mean and std over ``subsets`` random subsets (drawn as torch-fidelity draws them).

    When a set has fewer than ``subset_size`` vectors, the subset size becomes half
    the smaller set (at least 2): subsets of the whole set would all hold the
    same images and give a standard deviation of exactly 0, while the
    unbiased estimator's mean does not depend on the subset size.
    ``kid_subset_size`` in the result says which size was used.
    """
    n = min(len(real), len(fake))
    if n < 4:
        raise ValueError(f"KID needs at least 4 images per set, got {len(real)} real and {len(fake)} fake")
    size = subset_size if subset_size <= n else max(2, n // 2)
    rng = np.random.RandomState(seed)
    values = np.empty(subsets)
    for i in range(subsets):
        a = real[rng.choice(len(real), size, replace=False)]
        b = fake[rng.choice(len(fake), size, replace=False)]
        values[i] = polynomial_mmd2(a, b)
    return {
        "kid_mean": float(values.mean()),
        "kid_std": float(values.std()),
        "kid_subset_size": size,
        "kid_subsets": subsets,
    }


def _kth_nn_radius(x, k: int, block: int) -> np.ndarray:
    """Distance from each row of x to its k-th nearest other row (itself excluded by taking the (k+1)-th)."""
    import torch

    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    out = []
    for part in xt.split(block):
        d = torch.cdist(part, xt)
        out.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(out).numpy()


def _coverage(query, ref, radii, block: int) -> float:
    """Fraction of query rows inside at least one ball (ref_i, radii_i)."""
    import torch

    q = torch.from_numpy(np.ascontiguousarray(query, dtype=np.float32))
    r = torch.from_numpy(np.ascontiguousarray(ref, dtype=np.float32))
    rad = torch.from_numpy(np.asarray(radii, dtype=np.float32))
    inside = []
    for part in q.split(block):
        inside.append((torch.cdist(part, r) <= rad).any(dim=1))
    return float(torch.cat(inside).double().mean())


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, block: int = 2048) -> dict:
    """Improved precision (fake inside the real manifold) and recall (real inside the fake manifold)."""
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} images per set")
    precision = _coverage(fake, real, _kth_nn_radius(real, k, block), block)
    recall = _coverage(real, fake, _kth_nn_radius(fake, k, block), block)
    return {"precision": precision, "recall": recall}


def inception_score(logits: np.ndarray, splits: int = 10) -> dict:
    """Inception Score from 1008-class logits, in order, over ``splits`` equal parts."""
    z = np.asarray(logits, np.float64)
    n = len(z)
    if n < splits:
        raise ValueError(f"Inception Score with {splits} splits needs at least {splits} images, got {n}")
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    scores = []
    for i in range(splits):
        sl = slice(i * n // splits, (i + 1) * n // splits)
        q = p[sl].mean(axis=0, keepdims=True)
        kl = (p[sl] * (log_p[sl] - np.log(q))).sum(axis=1).mean()
        scores.append(math.exp(kl))
    return {"inception_score_mean": float(np.mean(scores)), "inception_score_std": float(np.std(scores))}


def vendi_from_gram(gram: np.ndarray, n: int) -> float:
    """Vendi score from sum(u u^T) over n normalised vectors: K/n and G/n share their non-zero eigenvalues."""
    if n < 1:
        raise ValueError("Vendi score of an empty set")
    ev = np.linalg.eigvalsh(np.asarray(gram, np.float64) / n)
    ev = ev[ev > 1e-12]
    return float(math.exp(-(ev * np.log(ev)).sum()))


def vendi_score(features: np.ndarray) -> float:
    """Vendi score with the cosine-similarity kernel (k(x, x) = 1)."""
    from histolab.evaluation.stats import normalise

    u = normalise(np.asarray(features, np.float64))
    # U U^T (n x n) and U^T U (d x d) share their non-zero eigenvalues: decompose the smaller one (a 2048 x 2048
    # eigendecomposition costs seconds on a CPU, the n x n of a small set nothing).
    return vendi_from_gram(u @ u.T if len(u) < u.shape[1] else u.T @ u, len(u))


def nearest_neighbours(query: np.ndarray, ref: np.ndarray, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """For each query row: index of its nearest ref row and the cosine distance 1 - cos to it."""
    from histolab.evaluation.stats import normalise

    q, r = normalise(np.asarray(query, np.float64)), normalise(np.asarray(ref, np.float64))
    idx = np.empty(len(q), dtype=np.int64)
    dist = np.empty(len(q))
    for s in range(0, len(q), block):
        sim = q[s : s + block] @ r.T
        j = sim.argmax(axis=1)
        idx[s : s + block] = j
        dist[s : s + block] = 1.0 - sim[np.arange(len(j)), j]
    return idx, np.clip(dist, 0.0, 2.0)
