"""Downstream utility: does synthetic data help a classifier? (The papers' train-on-synthetic test.)

A small CNN is trained three times, with the same seed and schedule, on
real patches, on real + synthetic, and on synthetic only, and each is tested
on the same held-out real patches. Small on purpose: three 3x3 conv stages
(16-32-64 channels) on 64 px inputs train in seconds on a CPU, and the
comparison between the three regimes is what matters, not the absolute
accuracy of a state-of-the-art classifier.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from histolab.errors import DataError, InvalidRequest
from histolab.threads import one_thread

REGIMES = ("real", "real+synthetic", "synthetic")


@dataclass(frozen=True)
class DownstreamConfig:
    size: int = 64  # input side; the bundled crops' size and the embedded model's
    epochs: int = 15  # enough for the small CNN to converge on a few hundred patches
    batch_size: int = 32
    lr: float = 2e-3  # Adam; a small net from scratch tolerates a larger step than Adam's 1e-3 default
    weight_decay: float = 1e-4
    seed: int = 0


def _tensor(image_set, size: int, classes: list[str]):
    import torch
    from PIL import Image

    xs, ys = [], []
    for i in range(len(image_set)):
        lab = image_set.items[i].label
        if lab is None:
            raise DataError(f"{image_set.spec}: image {image_set.items[i].name} has no class; downstream needs labels")
        if lab not in classes:
            continue
        img = image_set.load(i)
        if img.size != (size, size):
            img = img.resize((size, size), Image.BICUBIC)
        xs.append(np.asarray(img, dtype=np.float32) / 127.5 - 1.0)
        ys.append(classes.index(lab))
    if not xs:
        return torch.empty(0, 3, size, size), torch.empty(0, dtype=torch.long)
    return torch.from_numpy(np.stack(xs).transpose(0, 3, 1, 2).copy()), torch.tensor(ys)


def _net(n_classes: int):
    from torch import nn

    def stage(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

    return nn.Sequential(
        stage(3, 16), stage(16, 32), stage(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, n_classes)
    )


def _augment(x, gen):
    """Random dihedral transform per batch (tissue has no up or left)."""
    import torch

    k = int(torch.randint(0, 4, (1,), generator=gen))
    x = torch.rot90(x, k, dims=(2, 3))
    if int(torch.randint(0, 2, (1,), generator=gen)):
        x = torch.flip(x, dims=(3,))
    return x


def train_and_test(x_train, y_train, x_test, y_test, n_classes: int, config: DownstreamConfig) -> dict:
    # A tiny network: its layers are too small to split, and on a busy machine two spinning threads
    # make it an order of magnitude slower.
    with one_thread():
        return _train_and_test(x_train, y_train, x_test, y_test, n_classes, config)


def _train_and_test(x_train, y_train, x_test, y_test, n_classes: int, config: DownstreamConfig) -> dict:
    import torch

    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    net = _net(n_classes)
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps = config.epochs * max(1, -(-len(x_train) // config.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=steps)
    net.train()
    for _ in range(config.epochs):
        perm = torch.randperm(len(x_train), generator=gen)
        for s in range(0, len(perm), config.batch_size):
            idx = perm[s : s + config.batch_size]
            if len(idx) < 2:  # batch norm needs two samples
                continue
            loss = torch.nn.functional.cross_entropy(net(_augment(x_train[idx], gen)), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        pred = torch.cat([net(x_test[s : s + 256]).argmax(1) for s in range(0, len(x_test), 256)])
    return _scores(pred.numpy(), y_test.numpy(), n_classes)


def _scores(pred: np.ndarray, true: np.ndarray, n_classes: int) -> dict:
    recalls, f1s = [], []
    for c in range(n_classes):
        tp = int(((pred == c) & (true == c)).sum())
        fn = int(((pred != c) & (true == c)).sum())
        fp = int(((pred == c) & (true != c)).sum())
        rec = tp / (tp + fn) if tp + fn else 0.0
        prec = tp / (tp + fp) if tp + fp else 0.0
        recalls.append(rec)
        f1s.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
    return {
        "accuracy": float((pred == true).mean()),
        "balanced_accuracy": float(np.mean(recalls)),
        "macro_f1": float(np.mean(f1s)),
        "recall_per_class": recalls,
    }


def downstream_utility(real_train, synthetic, test, config: DownstreamConfig | None = None) -> dict:
    """Accuracy on held-out real ``test`` of the CNN trained on each regime (all ImageSets with labels)."""
    import torch

    config = config or DownstreamConfig()
    classes = sorted(set(real_train.classes) & set(test.classes))
    if len(classes) < 2:
        raise InvalidRequest(
            f"downstream utility needs at least two classes shared by the training and test sets, got {classes}"
        )
    x_real, y_real = _tensor(real_train, config.size, classes)
    x_syn, y_syn = _tensor(synthetic, config.size, classes)
    x_test, y_test = _tensor(test, config.size, classes)
    if len(x_syn) == 0:
        raise DataError(f"{synthetic.spec}: no synthetic images of the classes {classes}")
    data = {
        "real": (x_real, y_real),
        "real+synthetic": (torch.cat([x_real, x_syn]), torch.cat([y_real, y_syn])),
        "synthetic": (x_syn, y_syn),
    }
    results = {}
    for regime in REGIMES:
        x, y = data[regime]
        results[regime] = {"n_train": len(x), **train_and_test(x, y, x_test, y_test, len(classes), config)}
    return {"classes": classes, "n_test": len(x_test), "config": asdict(config), "results": results}
