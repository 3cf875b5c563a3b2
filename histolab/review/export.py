"""Exports: CSV tables and one JSON file, blinded (to share) or unblinded (owner only).

Blinded (the default) is safe to share with raters and co-authors before
unblinding: sources appear as their anonymous labels (Model A / Source A ...),
raters as R1, R2, ..., tasks as unit codes (U0001, assigned in a seeded random
order); there are no source names, paths, content hashes, recipes, source
kinds, Turing-test truth or answer history.

Unblinded (the owner's) adds: source names and kinds, the items behind each
unit (hashes, classes, original paths, recipes), the Turing-test results and
every revision of every answer.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from histolab.errors import StudyError
from histolab.review.analysis import Analysis, analyse
from histolab.review.blinding import rater_pseudonyms
from histolab.review.metrics_file import Metrics
from histolab.review.store import Store
from histolab.review.study import StudyInfo, load_study, require_owner

JUDGEMENT_WORDS = ("real", "synthetic")


class Namer:
    """How sources and raters are named in one export."""

    def __init__(self, info: StudyInfo, raters: list[str], blinded: bool):
        self.blinded = blinded
        self.labels = info.labels
        self.kinds = {s["name"]: s["kind"] for s in info.sources}
        self.pseudo = rater_pseudonyms(raters)

    def source(self, name: str | None) -> str | None:
        if name is None:
            return None
        return self.labels.get(name, "reference") if self.blinded else name

    def rater(self, rater: str) -> str:
        return self.pseudo.get(rater, "R?") if self.blinded else rater


def _clean(x: Any) -> Any:
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


def present(analysis: Analysis, info: StudyInfo, blinded: bool) -> dict[str, Any]:
    """The analysis as plain data, with names swapped (and truth left out) when blinded."""
    nm = Namer(info, analysis.raters, blinded)
    d = analysis.to_dict()
    out: dict[str, Any] = {
        "study_id": analysis.study_id,
        "mode": analysis.mode,
        "blinded": blinded,
        "raters": [nm.rater(r) for r in analysis.raters],
        "sources": [
            {"label": s["label"]} if blinded else {"name": s["name"], "kind": s["kind"], "label": s["label"]}
            for s in analysis.sources
        ],
        "progress": {nm.rater(r): {"done": p[0], "total": p[1]} for r, p in analysis.progress.items()},
        "median_time_ms": {nm.rater(r): t for r, t in analysis.median_time_ms.items()},
        "summaries": [{**s, "source": nm.source(s["source"])} for s in d["summaries"]],
        "agreement": d["agreement"],
        "artefacts": {nm.source(src): per for src, per in d["artefacts"].items()},
        "ranking": None,
        "correlations": d["correlations"],
    }
    if d["ranking"]:
        r = d["ranking"]
        out["ranking"] = {
            "n_raters": r["n_raters"],
            "kendall_w": r["kendall_w"],
            "mean_rank": {nm.source(k): v for k, v in r["mean_rank"].items()},
            "first_place": {nm.source(k): v for k, v in r["first_place"].items()},
        }
    if not blinded:
        out["turing"] = d["turing"]
        if d["turing"]:
            out["turing"]["per_rater"] = d["turing"]["per_rater"]
        out["unmatched_metric_keys"] = d["unmatched_metric_keys"]
    return _clean(out)


def tables(store: Store, study_id: str, blinded: bool, analysis: Analysis) -> dict[str, list[dict[str, Any]]]:
    """Every table of an export as rows (dicts)."""
    info = load_study(store, study_id)
    nm = Namer(info, analysis.raters, blinded)
    db = store.db
    a = [study_id]
    units = {
        r["unit_id"]: r for r in db.query("SELECT unit_id, code, kind, source, class FROM units WHERE study_id = ?", a)
    }

    def unit_cols(uid: int) -> dict[str, Any]:
        u = units[uid]
        d = {"unit": u["code"], "task_kind": u["kind"], "source": nm.source(u["source"])}
        if not blinded:
            d["source_kind"] = nm.kinds.get(u["source"])
            d["class"] = u["class"]
        return d

    cur = "" if not blinded else "AND current = 1"
    hist = [] if blinded else ["current", "superseded_at"]

    def rows(sql: str, cols: list[str]) -> list[dict[str, Any]]:
        out = []
        for r in db.query(sql, a):
            row = {**unit_cols(r["unit_id"]), "rater": nm.rater(r["rater_id"])}
            row.update({c: r[c] for c in cols})
            out.append(row)
        return out

    t: dict[str, list[dict[str, Any]]] = {}
    t["ratings"] = rows(
        f"""SELECT r.*, s.time_ms, s.received_at, s.revision FROM ratings r JOIN submissions s USING (submission_id)
            WHERE r.study_id = ? {cur} ORDER BY r.rating_id""",
        ["aspect", "value", "time_ms", "revision", "received_at", *hist],
    )
    t["artefacts"] = rows(
        f"SELECT * FROM artefact_marks WHERE study_id = ? {cur} ORDER BY mark_id", ["artefact", "present", *hist]
    )
    judg = rows(
        f"SELECT * FROM judgements WHERE study_id = ? {cur} ORDER BY judgement_id",
        ["says_synthetic", "confidence", *hist],
    )
    for j in judg:
        j["judgement"] = JUDGEMENT_WORDS[j.pop("says_synthetic")]
        if not blinded:
            truth = "synthetic" if j["source_kind"] == "generated" else "real"
            j["truth"], j["correct"] = truth, int(truth == j["judgement"])
    t["judgements"] = judg
    t["comments"] = rows(f"SELECT * FROM comments WHERE study_id = ? {cur} ORDER BY comment_id", ["text", *hist])
    t["rankings"] = [
        {"rater": nm.rater(r["rater_id"]), "source": nm.source(r["source"]), "rank": r["rank"]}
        | ({} if blinded else {"current": r["current"], "superseded_at": r["superseded_at"]})
        for r in db.query(f"SELECT * FROM rankings WHERE study_id = ? {cur} ORDER BY ranking_id", a)
    ]
    # The per-prompt ranks (prompt_ranking): one row per image ranked, by group code; sources named as above.
    t["prompt_ranks"] = [
        {"group": r["code"], "rater": nm.rater(r["rater_id"]), "source": nm.source(r["source"]), "rank": r["rank"]}
        | {"time_ms": r["time_ms"], "revision": r["revision"], "received_at": r["received_at"]}
        | ({} if blinded else {"class": r["class"], "current": r["current"], "superseded_at": r["superseded_at"]})
        for r in db.query(
            f"""SELECT g.code, g.class, p.rater_id, m.source, p.rank, p.current, p.superseded_at,
                       s.time_ms, s.revision, s.received_at
                FROM prompt_ranks p JOIN prompt_rank_groups g ON g.group_id = p.group_id
                JOIN prompt_rank_members m ON m.group_id = p.group_id AND m.item_id = p.item_id
                JOIN prompt_rank_submissions s ON s.submission_id = p.submission_id
                WHERE p.study_id = ? {"AND p.current = 1" if blinded else ""} ORDER BY g.code, p.rater_id, p.rank""",
            a,
        )
    ]
    view = present(analysis, info, blinded)
    t["summary"] = view["summaries"]
    t["agreement"] = [
        {
            **{k: v for k, v in g.items() if not k.endswith("_ci")},
            "icc_2_1_ci_low": (g["icc_2_1_ci"] or [None, None])[0],
            "icc_2_1_ci_high": (g["icc_2_1_ci"] or [None, None])[1],
            "icc_2_k_ci_low": (g["icc_2_k_ci"] or [None, None])[0],
            "icc_2_k_ci_high": (g["icc_2_k_ci"] or [None, None])[1],
        }
        for g in view["agreement"]
    ]
    t["artefact_rates"] = [
        {
            "source": src,
            "artefact": k,
            "marked": r["k"],
            "answers": r["n"],
            "share": r["value"],
            "ci_low": r["ci_low"],
            "ci_high": r["ci_high"],
        }
        for src, per in view["artefacts"].items()
        for k, r in per.items()
    ]
    t["correlations"] = view["correlations"]
    if not blinded:
        tur = view.get("turing")
        if tur:
            t["turing"] = [
                {
                    "rater": "all",
                    **_rates(tur["accuracy"], tur["sensitivity"], tur["specificity"]),
                    "p_vs_chance": tur["p_vs_chance"],
                }
            ] + [
                {
                    "rater": pr["rater"],
                    **_rates(pr["accuracy"], pr["sensitivity"], pr["specificity"]),
                    "mean_confidence": pr["mean_confidence"],
                }
                for pr in tur["per_rater"]
            ]
        t["items"] = [
            {
                "unit": units[r["unit_id"]]["code"] if r["unit_id"] in units else None,
                "source": r["source"],
                "source_kind": nm.kinds.get(r["source"]),
                "role": r["role"],
                "class": r["class"],
                "sha256": r["sha256"],
                "pixel_sha256": r["pixel_sha256"],
                "prompt_shown": r["prompt_shown"],
                "original_path": r["original_path"],
                "recipe": r["recipe_json"],
            }
            for r in db.query(
                """SELECT i.*, s.role, ui.unit_id FROM items i JOIN sources s ON s.study_id = i.study_id AND s.name = i.source
                   LEFT JOIN unit_items ui ON ui.item_id = i.item_id WHERE i.study_id = ? ORDER BY i.item_id""",
                a,
            )
        ]
        t["assignments"] = [
            {k: r[k] for k in ("rater_id", "position", "task_id", "first_served_at", "done_at")}
            | {"unit": units[r["unit_id"]]["code"]}
            for r in db.query("SELECT * FROM assignments WHERE study_id = ? ORDER BY rater_id, position", a)
        ]
    return {k: [_clean(r) for r in v] for k, v in t.items()}


def _rates(acc, sens, spec) -> dict[str, Any]:
    out = {}
    for name, r in (("accuracy", acc), ("sensitivity", sens), ("specificity", spec)):
        out.update(
            {
                f"{name}": r["value"],
                f"{name}_k": r["k"],
                f"{name}_n": r["n"],
                f"{name}_ci_low": r["ci_low"],
                f"{name}_ci_high": r["ci_high"],
            }
        )
    return out


def study_definition(info: StudyInfo, blinded: bool) -> dict[str, Any]:
    d = {
        "study_id": info.study_id,
        "title": info.title,
        "mode": info.mode,
        "template": info.template,
        "turing_test": info.turing_test,
        "ranking": info.ranking,
        "set_size": info.set_size,
        "image_size": info.image_size,
        "instructions": info.instructions,
        "aspects": [{"key": a.key, "label": a.label, "type": a.type, "scope": a.scope} for a in info.aspects],
        "artefacts": [{"key": a.key, "label": a.label} for a in info.artefacts],
        "blinded": blinded,
    }
    if not blinded:
        d["owner"] = info.owner
        d["seed"] = info.seed
        d["sources"] = [{k: v for k, v in s.items()} for s in info.sources]
    return d


def export_study(
    store: Store,
    study_id: str,
    out_dir: str | Path,
    fmt: str = "csv",
    blinded: bool = True,
    owner: str | None = None,
    metrics: Metrics | None = None,
) -> list[Path]:
    """Write the study's tables as CSV files (``fmt="csv"``), one JSON file (``"json"``) or both (``"all"``)."""
    if fmt not in ("csv", "json", "all"):
        raise StudyError(f"export format must be 'csv', 'json' or 'all' but is {fmt!r}")
    info = load_study(store, study_id)
    if not blinded:
        require_owner(info, owner)
    analysis = analyse(store, study_id, metrics=metrics)
    t = tables(store, study_id, blinded, analysis)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tag = "blinded" if blinded else "unblinded"
    written = []
    if fmt in ("csv", "all"):
        for name, rows in t.items():
            path = out / f"{study_id}_{tag}_{name}.csv"
            _write_csv(path, rows)
            written.append(path)
    if fmt in ("json", "all"):
        path = out / f"{study_id}_{tag}.json"
        doc = {"study": study_definition(info, blinded), "analysis": present(analysis, info, blinded), "tables": t}
        path.write_text(json.dumps(doc, indent=1, sort_keys=True, ensure_ascii=False), encoding="utf-8")
        written.append(path)
    return written


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    cols: list[str] = []
    for r in rows:
        cols.extend(k for k in r if k not in cols)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=cols or ["empty"])
        w.writeheader()
        for r in rows:
            w.writerow({k: (json.dumps(v) if isinstance(v, dict | list) else v) for k, v in r.items()})
