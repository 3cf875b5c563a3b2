"""The paper's table from a reproduction: CSV and Markdown, and a plot of validation FID by epoch per run.

Per class: FID, KID x1000 as mean ± std over subsets, precision and recall (k = 3), and the Inception Score
where the paper reports it (cxr-2025; it needs the user's Inception head file). The 2026 paper's table also
lists every configuration's best validation FID and epoch (its Table 6), the chosen one marked.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path


def _fmt(v, digits: int = 2) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def rows_for(plan, results, chosen, evals) -> list[dict[str, str]]:
    rows = []
    for rid in chosen:
        run = next(r for r in plan.runs if r.id == rid)
        for cls, m in evals[rid]["per_class"].items():
            row = {"run": rid, "preset": run.preset, "class": cls}
            row["n_real"], row["n_fake"] = str(m.get("n_real", "")), str(m.get("n_fake", ""))
            row["FID"] = _fmt(m.get("fid"))
            if m.get("kid_x1000_mean") is not None:
                row["KID x1000"] = f"{m['kid_x1000_mean']:.2f} ± {m['kid_x1000_std']:.2f}"
            else:
                row["KID x1000"] = ""
            row["precision"], row["recall"] = _fmt(m.get("precision"), 3), _fmt(m.get("recall"), 3)
            if "IS" in plan.metrics:
                row["IS"] = (
                    f"{m['inception_score_mean']:.2f} ± {m['inception_score_std']:.2f}"
                    if m.get("inception_score_mean") is not None
                    else "not computed (no --inception-head)"
                )
            rows.append(row)
    return rows


def validation_rows(results) -> list[dict[str, str]]:
    out = []
    for rid, res in results.items():
        fids = [(h.get("epoch"), h.get("inception/fid")) for h in res["history"] if h.get("inception/fid") is not None]
        if fids:
            ep, fid = min(fids, key=lambda x: x[1])
            out.append({"run": rid, "best epoch": str(ep), "validation FID": _fmt(fid)})
    return out


def _markdown(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "(no rows)\n"
    cols = list(rows[0])
    buf = io.StringIO()
    buf.write("| " + " | ".join(cols) + " |\n| " + " | ".join("---" for _ in cols) + " |\n")
    for r in rows:
        buf.write("| " + " | ".join(r.get(c, "") for c in cols) + " |\n")
    return buf.getvalue()


def _csv(path: Path, rows: list[dict[str, str]]) -> None:
    cols = list(rows[0]) if rows else ["run"]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


def plot_fid_by_epoch(path: Path, results) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = 0
    for rid, res in results.items():
        pts = [(h["epoch"], h["inception/fid"]) for h in res["history"] if h.get("inception/fid") is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=rid)
            drawn += 1
    if drawn:
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation FID")
        ax.legend(fontsize=7, ncol=2)
    else:
        ax.text(0.5, 0.5, "no per-epoch validation in this paper's protocol\n(nothing held out)", ha="center")
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_tables(out: Path, plan, results, chosen, evals) -> dict[str, Path]:
    rows = rows_for(plan, results, chosen, evals)
    paths = {"csv": out / "table.csv", "md": out / "table.md", "plot": out / "fid_by_epoch.png"}
    _csv(paths["csv"], rows)
    md = [f"# {plan.paper}{' (smoke scale: not the paper numbers)' if plan.smoke else ''}\n", _markdown(rows)]
    val = validation_rows(results)
    if val:
        for r in val:
            r["chosen"] = "yes" if r["run"] in chosen else ""
        paths["validation_csv"] = out / "table_validation.csv"
        _csv(paths["validation_csv"], val)
        md += ["\n## Validation FID per configuration (best epoch)\n", _markdown(val)]
    notes = sorted({e.get("note", "") for e in evals.values() if e.get("note")})
    md += [f"\n{n}\n" for n in notes if "IS" in plan.metrics]
    paths["md"].write_text("".join(md), encoding="utf-8")
    plot_fid_by_epoch(paths["plot"], results)
    return paths
