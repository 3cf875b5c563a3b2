"""Reports: JSON and CSV beside the run, PNG figures (matplotlib, Agg backend)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from histolab.evaluation.evaluate import metric_name

SCALAR_KEYS = (
    "n_real",
    "n_fake",
    "fid",
    "fd",
    "kid_mean",
    "kid_std",
    "kid_x1000_mean",
    "kid_x1000_std",
    "kid_subset_size",
    "precision",
    "recall",
    "inception_score_mean",
    "inception_score_std",
    "vendi_real",
    "vendi_fake",
)


def metric_rows(report: dict) -> list[dict]:
    """One row per (space, class): the table of the CSV report."""
    rows = []
    for space, res in report["spaces"].items():
        groups = [("all", res["overall"]), *list(res.get("per_class", {}).items())]
        for cls, values in groups:
            row = {"space": space, "class": cls}
            row.update({k: values[k] for k in SCALAR_KEYS if k in values})
            rows.append(row)
    return rows


def write_csv(rows: list[dict], path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for r in rows:
        keys.extend(k for k in r if k not in keys)
    with open(p, "w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=keys)
        wr.writeheader()
        wr.writerows(rows)
    return p


def write_json(obj, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(obj, indent=2, allow_nan=False, default=_json_default) + "\n")
    return p


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def summary_lines(report: dict) -> list[str]:
    """The human-readable table the CLI prints."""
    lines = []
    for space, res in report["spaces"].items():
        fd = metric_name(space)
        lines.append(f"[{space}] ({res['extractor']['dim']}-d)")
        groups = [("all", res["overall"]), *list(res.get("per_class", {}).items())]
        for cls, v in groups:
            parts = [f"{cls:>12}", f"n={v.get('n_real', 0)}/{v.get('n_fake', 0)}"]
            if fd in v:
                parts.append(f"{fd.upper()}={v[fd]:.4f}")
            if "kid_mean" in v:
                parts.append(f"KIDx1000={v['kid_x1000_mean']:.3f}±{v['kid_x1000_std']:.3f}")
            if "precision" in v:
                parts.append(f"P={v['precision']:.3f} R={v['recall']:.3f}")
            if "inception_score_mean" in v:
                parts.append(f"IS={v['inception_score_mean']:.3f}±{v['inception_score_std']:.3f}")
            if "vendi_fake" in v:
                parts.append(f"Vendi fake={v['vendi_fake']:.3f} real={v['vendi_real']:.3f}")
            lines.append("  ".join(parts))
        if "inception_score_note" in res:
            lines.append(f"  IS: {res['inception_score_note']}")
        mem = res.get("memorisation")
        if mem:
            lines.append(
                f"  memorisation: {mem['near_copies']} near-copies of {len(mem['pairs'])} "
                f"(threshold {mem['threshold']:.5f}; median NN distance {mem['fake_nn_distance_median']:.5f})"
            )
    return lines


# ------------------------------------------------------------------ figures


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_per_class_kid(report: dict, path: str | Path) -> Path | None:
    """Bars of KID x 1000 (mean ± std over subsets) per class, one group per feature space."""
    spaces = {s: r["per_class"] for s, r in report["spaces"].items() if r.get("per_class")}
    if not spaces:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(spaces), figsize=(4.5 * len(spaces), 3.6), squeeze=False)
    for ax, (space, per) in zip(axes[0], spaces.items(), strict=True):
        classes = [c for c in per if "kid_mean" in per[c]]
        ax.bar(
            classes,
            [per[c]["kid_x1000_mean"] for c in classes],
            yerr=[per[c]["kid_x1000_std"] for c in classes],
            capsize=4,
            color="#4c72b0",
        )
        ax.set_title(f"KID x 1000 per class ({space})")
        ax.tick_params(axis="x", rotation=30)
        ax.axhline(0, color="k", lw=0.5)
    fig.tight_layout()
    return _save(fig, path, plt)


def plot_series(xs, series: dict[str, list[float]], xlabel: str, ylabel: str, title: str, path) -> Path:
    """A line per series (FID by epoch, FID by guidance)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, ys in series.items():
        pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None and not math.isnan(y)]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
            best = min(pts, key=lambda p: p[1])
            ax.annotate(f"{best[1]:.2f}", best, textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path, plt)


def plot_nn_pairs(pairs: list[dict], load_fake, load_train, path, title: str = "") -> Path | None:
    """Synthetic images (top) above their nearest training images (bottom), closest first."""
    if not pairs:
        return None
    plt = _plt()
    n = len(pairs)
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.8), squeeze=False)
    for j, pr in enumerate(pairs):
        for row, img in ((0, load_fake(pr["fake"])), (1, load_train(pr["train"]))):
            ax = axes[row][j]
            ax.imshow(img)
            ax.set_xticks([])
            ax.set_yticks([])
            if pr.get("near_copy") and row == 0:
                for s in ax.spines.values():
                    s.set_edgecolor("red")
                    s.set_linewidth(3)
        axes[1][j].set_xlabel(f"{pr['distance']:.4f}", fontsize=8)
    axes[0][0].set_ylabel("synthetic")
    axes[1][0].set_ylabel("nearest train")
    fig.suptitle(title or "nearest training image per synthetic image (cosine distance; red: near-copy)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path, plt)


def _save(fig, path, plt) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p
