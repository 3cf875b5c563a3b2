"""How well embeddings separate labelled classes: k-NN and linear-probe
balanced accuracy, and the silhouette score.

Balanced accuracy (mean of per-class recalls) because the bundled test split
is unbalanced (skin crops outnumber the others about 8:1), so plain accuracy
would reward a skin-detector. Small and dependency-free (torch only).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def balanced_accuracy(pred: np.ndarray, true: np.ndarray) -> float:
    classes = np.unique(true)
    return float(np.mean([np.mean(pred[true == c] == c) for c in classes]))


def knn_predict(train: torch.Tensor, train_y: np.ndarray, test: torch.Tensor, k: int = 10) -> np.ndarray:
    """Majority vote of the k most cosine-similar training embeddings (ties: the nearer class)."""
    a, b = F.normalize(train.float(), dim=1), F.normalize(test.float(), dim=1)
    sim = b @ a.T
    top = sim.topk(k, dim=1)
    n_cls = int(train_y.max()) + 1
    votes = np.zeros((len(test), n_cls))
    idx, s = top.indices.numpy(), top.values.numpy()
    for j in range(k):
        # The similarity is added as a tiny tie-breaker only.
        np.add.at(votes, (np.arange(len(test)), train_y[idx[:, j]]), 1.0 + 1e-6 * s[:, j])
    return votes.argmax(1)


def knn_balanced_accuracy(train, train_y, test, test_y, k: int = 10) -> float:
    return balanced_accuracy(knn_predict(train, np.asarray(train_y), test, k), np.asarray(test_y))


def linear_probe_balanced_accuracy(train, train_y, test, test_y, weight_decay: float = 1e-3, seed: int = 0) -> float:
    """Multinomial logistic regression on standardised features (L-BFGS, class-balanced loss)."""
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    mu, sd = train.mean(0), train.std(0) + 1e-6
    xa, xb = (train.float() - mu) / sd, (test.float() - mu) / sd
    n_cls = int(train_y.max()) + 1
    ya = torch.from_numpy(train_y).long()
    counts = torch.bincount(ya, minlength=n_cls).float()
    w_cls = counts.sum() / (n_cls * counts.clamp(min=1))
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(xa.shape[1], n_cls)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.01)
        lin.bias.zero_()
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(xa), ya, weight=w_cls) + weight_decay * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        pred = lin(xb).argmax(1).numpy()
    return balanced_accuracy(pred, test_y)


def silhouette(emb: torch.Tensor, y, metric: str = "cosine") -> float:
    """Mean silhouette coefficient (Rousseeuw 1987) with cosine or euclidean distance."""
    y = np.asarray(y)
    x = emb.float()
    if metric == "cosine":
        x = F.normalize(x, dim=1)
        d = (1 - x @ x.T).clamp(min=0)
    else:
        d = torch.cdist(x, x)
    d = d.numpy()
    classes = np.unique(y)
    n = len(y)
    s = np.zeros(n)
    for i in range(n):
        same = y == y[i]
        same[i] = False
        if not same.any():
            continue
        a = d[i, same].mean()
        b = min(d[i, y == c].mean() for c in classes if c != y[i])
        s[i] = (b - a) / max(a, b) if max(a, b) > 0 else 0.0
    return float(s.mean())


def _bundled_images(split: str, stride: int, grey: bool):
    from histolab.data import bundled

    labels = bundled.labels()
    cs = bundled.crops(split, stride)
    ims = [bundled.load_crop(c) for c in cs]
    if grey:
        # ITU-R 601 luma (PIL's "L"), back to three channels: the colour is gone, the morphology stays.
        ims = [im.convert("L").convert("RGB") for im in ims]
    return ims, np.array([labels.index(c.label) for c in cs])


def separation_report(encoder, splits=("val", "test"), stride: int = 16, ref_stride: int = 32, k: int = 10) -> dict:
    """How well ``encoder``'s embeddings separate the bundled tissue classes on held-out bands.

    References are the training band's crops (every ``ref_stride`` px); the
    evaluated crops come from ``splits`` (every ``stride`` px), which share no
    pixel with the references. ``<split>_grey`` repeats the k-NN with every
    image (references too) turned to grey: what is left is morphology.
    """
    from histolab.data import bundled

    labels = bundled.labels()
    out: dict = {}
    for grey in (False, True):
        ref_ims, ref_y = _bundled_images("train", ref_stride, grey)
        ref = encoder.encode(ref_ims)
        for split in splits:
            ims, y = _bundled_images(split, stride, grey)
            emb = encoder.encode(ims)
            pred = knn_predict(ref, ref_y, emb, k)
            entry = {
                "n": {lab: int((y == i).sum()) for i, lab in enumerate(labels)},
                "knn_balanced_accuracy": round(balanced_accuracy(pred, y), 4),
                "knn_recall": {lab: round(float(np.mean(pred[y == i] == i)), 4) for i, lab in enumerate(labels)},
            }
            if not grey:
                entry["linear_probe_balanced_accuracy"] = round(linear_probe_balanced_accuracy(ref, ref_y, emb, y), 4)
                entry["silhouette_cosine"] = round(silhouette(emb, y), 4)
            out[f"{split}_grey" if grey else split] = entry
    return out
