"""A self-contained HTML report (plots as base64 PNG, no external files or scripts).

``blinded=True`` (the default) is the shareable report: anonymous labels, rater
pseudonyms, no Turing-test truth, no per-source metric values. The owner's
``blinded=False`` report names the sources and adds the Turing test and the
metric scatter plots. The report says at its top which one it is.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
from pathlib import Path
from typing import Any

from histolab.review.analysis import OVERALL, analyse
from histolab.review.export import present, tables
from histolab.review.metrics_file import Metrics
from histolab.review.store import Store
from histolab.review.study import load_study, require_owner

MAX_COMMENTS = 200  # in the report; the exports hold them all


def _fig_to_img(fig, alt: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _fmt(x: Any, nd: int = 2) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return html.escape(str(x))


def _table(rows: list[list[Any]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _ci(lo: Any, hi: Any) -> str:
    return "–" if lo is None or hi is None else f"[{lo:.2f}, {hi:.2f}]"


def _summary_plot(view: dict[str, Any], aspects: list[str]) -> str:
    import matplotlib.pyplot as plt

    sources = [s["label"] if view["blinded"] else s["name"] for s in view["sources"]]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(aspects)), 3.6))
    width = 0.8 / max(1, len(sources))
    for i, src in enumerate(sources):
        xs, ys, lo, hi = [], [], [], []
        for j, a in enumerate(aspects):
            s = next((s for s in view["summaries"] if s["source"] == src and s["aspect"] == a), None)
            if s is None or s["mean"] is None:
                continue
            xs.append(j + (i - (len(sources) - 1) / 2) * width)
            ys.append(s["mean"])
            lo.append(s["mean"] - (s["ci_low"] if s["ci_low"] is not None else s["mean"]))
            hi.append((s["ci_high"] if s["ci_high"] is not None else s["mean"]) - s["mean"])
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", capsize=3, label=src)
    ax.set_xticks(range(len(aspects)), [a.replace("_", " ") for a in aspects], rotation=20, ha="right")
    ax.set_ylim(0, 10)
    ax.set_ylabel("mean score (95% CI)")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    return _fig_to_img(fig, "mean score per aspect and source")


def _artefact_plot(view: dict[str, Any]) -> str:
    import matplotlib.pyplot as plt
    import numpy as np

    srcs = list(view["artefacts"])
    arts = list(next(iter(view["artefacts"].values()), {}))
    if not srcs or not arts:
        return ""
    m = np.array([[view["artefacts"][s][a]["value"] or 0.0 for a in arts] for s in srcs])
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(arts)), 0.5 * len(srcs) + 1.6))
    im = ax.imshow(m, vmin=0, vmax=1, cmap="Reds", aspect="auto")
    ax.set_xticks(range(len(arts)), [a.replace("_", " ") for a in arts], rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(srcs)), srcs)
    for i in range(len(srcs)):
        for j in range(len(arts)):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, label="share of answers marking it")
    return _fig_to_img(fig, "artefact frequency per source")


def _turing_plot(tur: dict[str, Any]) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    for pr in tur["per_rater"]:
        se, sp = pr["sensitivity"]["value"], pr["specificity"]["value"]
        if se is None or sp is None:
            continue
        ax.plot(1 - sp, se, "o")
        ax.annotate(pr["rater"], (1 - sp, se), fontsize=8, xytext=(3, 3), textcoords="offset points")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="chance")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("1 - specificity (real called synthetic)")
    ax.set_ylabel("sensitivity (synthetic called synthetic)")
    ax.legend(fontsize=8)
    return _fig_to_img(fig, "per-rater sensitivity and specificity")


def _ranking_plot(rank: dict[str, Any]) -> str:
    import matplotlib.pyplot as plt

    names = sorted(rank["mean_rank"], key=rank["mean_rank"].get)
    fig, ax = plt.subplots(figsize=(5, 0.45 * len(names) + 1.2))
    ax.barh(names, [rank["mean_rank"][n] for n in names], color="#4c72b0")
    ax.invert_yaxis()
    ax.set_xlabel("mean rank (1 = best)")
    return _fig_to_img(fig, "mean rank per model")


def _metric_plots(view: dict[str, Any], metrics: Metrics) -> str:
    import matplotlib.pyplot as plt

    out = []
    overall = {s["source"]: s["mean"] for s in view["summaries"] if s["aspect"] == OVERALL}
    for name in metrics.names:
        pts = [(metrics.sets[s][name], overall[s], s) for s in overall if s in metrics.sets and name in metrics.sets[s]]
        pts = [p for p in pts if p[1] is not None]
        if len(pts) < 2:
            continue
        fig, ax = plt.subplots(figsize=(4.2, 3.4))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o")
        for x, y, s in pts:
            ax.annotate(s, (x, y), fontsize=8, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(name)
        ax.set_ylabel("mean overall expert score")
        out.append(_fig_to_img(fig, f"{name} against expert score"))
    return "".join(out)


_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0 1.4em;font-size:.9em}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f3f3f3}.banner{padding:.6em 1em;border-radius:4px;margin:1em 0}
.blind{background:#e8f4e8;border:1px solid #8c8}.open{background:#fbeaea;border:1px solid #c88}
img{max-width:100%}
"""


def render_report(
    store: Store, study_id: str, blinded: bool = True, owner: str | None = None, metrics: Metrics | None = None
) -> str:
    info = load_study(store, study_id)
    if not blinded:
        require_owner(info, owner)
    import matplotlib

    matplotlib.use("Agg")
    analysis = analyse(store, study_id, metrics=metrics)
    view = present(analysis, info, blinded)
    aspects = [a.key for a in info.aspects] + [OVERALL]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(info.title)}</title>"]
    parts.append(f"<style>{_CSS}</style></head><body>")
    parts.append(f"<h1>{html.escape(info.title)}</h1>")
    if blinded:
        parts.append(
            "<div class='banner blind'><b>Blinded report.</b> Sources appear under anonymous labels and raters "
            "as R1, R2, ...; it holds no source names, file names, hashes, recipes or Turing-test truth, "
            "so it can be shared with raters before unblinding.</div>"
        )
    else:
        parts.append(
            "<div class='banner open'><b>Unblinded report (owner only).</b> It names the sources behind the labels "
            "and gives the Turing-test results. Do not share it with raters while the study runs.</div>"
        )
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts.append(
        f"<p>Study <code>{html.escape(info.study_id)}</code>, {info.mode} mode ({info.template} template), "
        f"{len(view['raters'])} rater(s), report made {stamp}.</p>"
    )
    parts.append("<h2>Sources</h2>")
    if blinded:
        parts.append(_table([[s["label"]] for s in view["sources"]], ["label"]))
    else:
        parts.append(_table([[s["name"], s["kind"], s["label"]] for s in view["sources"]], ["source", "kind", "label"]))
    parts.append("<h2>Progress</h2>")
    parts.append(
        _table(
            [[r, p["done"], p["total"], view["median_time_ms"].get(r)] for r, p in view["progress"].items()],
            ["rater", "done", "tasks", "median time per task (ms)"],
        )
    )
    parts.append(
        "<h2>Scores</h2><p>Mean with a 95% bootstrap interval over units (items or sets); overall is each answer's mean over the aspects.</p>"
    )
    if any(s["n_ratings"] for s in view["summaries"]):
        parts.append(_summary_plot(view, aspects))
    parts.append(
        _table(
            [
                [
                    s["source"],
                    s["aspect"],
                    s["n_ratings"],
                    s["n_units"],
                    s["n_raters"],
                    s["mean"],
                    s["sd"],
                    s["median"],
                    _ci(s["ci_low"], s["ci_high"]),
                ]
                for s in view["summaries"]
            ],
            ["source", "aspect", "ratings", "units", "raters", "mean", "SD", "median", "95% CI"],
        )
    )
    parts.append(
        "<h2>Inter-rater agreement</h2><p>Krippendorff's alpha (interval metric, all ratings). "
        "ICC(2,1) and ICC(2,k): Shrout &amp; Fleiss two-way random effects, absolute agreement, single rater and mean "
        "of k raters, on the units every rater scored, with F-based 95% intervals.</p>"
    )
    parts.append(
        _table(
            [
                [
                    g["aspect"],
                    g["n_units"],
                    g["n_raters"],
                    g["alpha_interval"],
                    g["icc_units"],
                    g["icc_2_1"],
                    _ci(*(g["icc_2_1_ci"] or [None, None])),
                    g["icc_2_k"],
                    _ci(*(g["icc_2_k_ci"] or [None, None])),
                ]
                for g in view["agreement"]
            ],
            ["aspect", "units", "raters", "alpha", "ICC units", "ICC(2,1)", "95% CI", "ICC(2,k)", "95% CI"],
        )
    )
    tur = view.get("turing")
    if not blinded and tur:
        acc = tur["accuracy"]
        parts.append("<h2>Visual Turing test</h2>")
        parts.append(
            f"<p>Accuracy {acc['k']}/{acc['n']} = {_fmt(acc['value'])} (Wilson 95% CI {_ci(acc['ci_low'], acc['ci_high'])}); "
            f"exact binomial test against guessing p = {_fmt(tur['p_vs_chance'], 4)}. Sensitivity (synthetic called synthetic) "
            f"{_fmt(tur['sensitivity']['value'])}, specificity (real called real) {_fmt(tur['specificity']['value'])}.</p>"
        )
        parts.append(
            _table(
                [
                    [
                        pr["rater"],
                        pr["accuracy"]["value"],
                        _ci(pr["accuracy"]["ci_low"], pr["accuracy"]["ci_high"]),
                        pr["sensitivity"]["value"],
                        _ci(pr["sensitivity"]["ci_low"], pr["sensitivity"]["ci_high"]),
                        pr["specificity"]["value"],
                        _ci(pr["specificity"]["ci_low"], pr["specificity"]["ci_high"]),
                        pr["mean_confidence"],
                    ]
                    for pr in tur["per_rater"]
                ],
                [
                    "rater",
                    "accuracy",
                    "95% CI",
                    "sensitivity",
                    "95% CI",
                    "specificity",
                    "95% CI",
                    "mean confidence (1-5)",
                ],
            )
        )
        parts.append(
            _table(
                [
                    [s, r["k"], r["n"], r["value"], _ci(r["ci_low"], r["ci_high"])]
                    for s, r in tur["called_synthetic"].items()
                ],
                ["source", "called synthetic", "judgements", "share", "95% CI"],
            )
        )
        if tur["per_rater"]:
            parts.append(_turing_plot(tur))
    parts.append("<h2>Artefacts</h2>")
    parts.append(_artefact_plot(view))
    if view.get("ranking"):
        rank = view["ranking"]
        parts.append(
            f"<h2>Ranking of the models</h2><p>{rank['n_raters']} complete ranking(s); Kendall's W = {_fmt(rank['kendall_w'])}.</p>"
        )
        parts.append(_ranking_plot(rank))
        parts.append(
            _table(
                [[k, v, rank["first_place"][k]] for k, v in rank["mean_rank"].items()],
                ["model", "mean rank", "ranked first"],
            )
        )
    if view["correlations"]:
        parts.append(
            "<h2>Expert scores against metrics</h2><p>Spearman's rho between the raters' mean and each metric.</p>"
        )
        parts.append(
            _table(
                [[c["level"], c["metric"], c["target"], c["n"], c["rho"], c["p"]] for c in view["correlations"]],
                ["level", "metric", "expert measure", "n", "rho", "p"],
            )
        )
        if not blinded and metrics is not None:
            parts.append(_metric_plots(view, metrics))
    comments = tables(store, study_id, blinded, analysis)["comments"]
    if comments:
        parts.append("<h2>Comments</h2>")
        rows = [[c["unit"], c["source"], c["rater"], c["text"]] for c in comments if c.get("current", 1)][:MAX_COMMENTS]
        parts.append(_table(rows, ["unit", "source", "rater", "comment"]))
    parts.append("</body></html>")
    return "\n".join(p for p in parts if p)


def write_report(
    store: Store,
    study_id: str,
    path: str | Path,
    blinded: bool = True,
    owner: str | None = None,
    metrics: Metrics | None = None,
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(store, study_id, blinded=blinded, owner=owner, metrics=metrics), encoding="utf-8")
    return path
