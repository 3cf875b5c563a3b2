"""Analysis, metrics files, exports and the HTML report, on ratings whose truth the test knows."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
from test_review_support import MODELS, REAL, make_sources, new_id, study_dict

from histolab.errors import StudyError
from histolab.review import Answers, Store, create_study, next_task, parse_config, submit, unblind
from histolab.review import stats as st
from histolab.review.analysis import OVERALL, analyse
from histolab.review.export import export_study
from histolab.review.metrics_file import load_metrics
from histolab.review.report import render_report

# What each simulated rater does, by the truth behind the task.
MEAN = {REAL: 8, MODELS[0]: 5, MODELS[1]: 2}


@pytest.fixture(scope="module")
def rated(tmp_path_factory):
    """Two raters rate everything: scores centred on MEAN[source]; ann always judges right, bob always says synthetic."""
    tmp = tmp_path_factory.mktemp("analysis")
    sources = make_sources(tmp)
    store = Store(tmp / "ann")
    cfg = study_dict(sources)
    create_study(store, parse_config(cfg))
    truth = {r["task_id"]: r for r in unblind(store, "s1", "olivia")}
    log = []  # (rater, unit, source, aspect, value, says_synthetic)
    rng = np.random.default_rng(0)
    for rater in ("ann", "bob"):
        while (task := next_task(store, "s1", rater)) is not None:
            t = truth[task.task_id]
            scores = {a.key: int(np.clip(MEAN[t["source"]] + rng.integers(-1, 2), 0, 10)) for a in task.aspects}
            says = (t["source_kind"] == "generated") if rater == "ann" else True
            arts = ("colour_cast",) if t["source"] == MODELS[1] else ()
            submit(
                store,
                "s1",
                rater,
                task.task_id,
                Answers(
                    scores=scores, artefacts=arts, judgement=("real", "synthetic")[says], confidence=4, comment="ok"
                ),
                new_id(),
            )
            for k, v in scores.items():
                log.append((rater, t["unit"], t["source"], k, v, says))
    return store, log, tmp


def test_summaries_match_the_ratings_given(rated):
    store, log, _ = rated
    a = analyse(store, "s1")
    for s in a.summaries:
        if s.aspect == OVERALL:
            per_task: dict = {}
            for r, u, src, _k, v, _ in log:
                if src == s.source:
                    per_task.setdefault((r, u), []).append(v)
            vals = [np.mean(v) for v in per_task.values()]
        else:
            vals = [v for r, u, src, k, v, _ in log if src == s.source and k == s.aspect]
        assert s.n_ratings == len(vals) and s.n_units == 9 and s.n_raters == 2
        assert s.mean == pytest.approx(np.mean(vals))
        assert s.median == pytest.approx(np.median(vals))
        assert s.ci_low < s.mean < s.ci_high
    means = {s.source: s.mean for s in a.summaries if s.aspect == OVERALL}
    assert means[REAL] > means[MODELS[0]] > means[MODELS[1]]


def test_agreement_matches_the_matrix(rated):
    store, log, _ = rated
    a = analyse(store, "s1")
    g = next(x for x in a.agreement if x.aspect == "clinical_realism")
    value = {(r, u): v for r, u, _s, k, v, _ in log if k == "clinical_realism"}
    units = sorted({u for _r, u in value})
    m = np.array([[value[(r, u)] for u in units] for r in ("ann", "bob")], dtype=float)
    assert g.alpha_interval == pytest.approx(st.krippendorff_alpha(m, "interval"))
    assert g.icc_2_1 == pytest.approx(st.icc(m.T).icc["ICC(2,1)"])
    assert g.icc_2_k == pytest.approx(st.icc(m.T).icc["ICC(2,k)"])
    assert (g.n_units, g.n_raters, g.icc_units) == (27, 2, 27)
    assert g.alpha_interval > 0.8  # the sources differ far more than the raters' noise


def test_turing_test(rated):
    store, _, _ = rated
    t = analyse(store, "s1").turing
    ann = next(r for r in t.per_rater if r.rater == "ann")
    bob = next(r for r in t.per_rater if r.rater == "bob")
    assert (ann.accuracy.k, ann.accuracy.n, ann.sensitivity.value, ann.specificity.value) == (27, 27, 1.0, 1.0)
    assert (bob.accuracy.k, bob.sensitivity.value, bob.specificity.value) == (18, 1.0, 0.0)
    assert (t.accuracy.k, t.accuracy.n) == (45, 54)
    assert (t.accuracy.ci_low, t.accuracy.ci_high) == pytest.approx(st.binomial_ci(45, 54))
    assert t.p_vs_chance < 1e-4
    assert t.called_synthetic[REAL].value == 0.5 and t.called_synthetic[MODELS[0]].value == 1.0


def test_artefact_rates(rated):
    store, _, _ = rated
    arts = analyse(store, "s1").artefacts
    assert arts[MODELS[1]]["colour_cast"].value == 1.0 and arts[MODELS[1]]["colour_cast"].n == 18
    assert arts[REAL]["colour_cast"].value == 0.0 and arts[REAL]["tiling_seams"].n == 18


def _item_hashes(store):
    return {
        u: (sha, src)
        for u, sha, src in store.db.execute(
            "SELECT u.code, i.sha256, i.source FROM units u JOIN unit_items ui ON ui.unit_id = u.unit_id JOIN items i ON i.item_id = ui.item_id"
        )
    }


def test_correlation_with_per_item_and_per_set_metrics(rated, tmp_path):
    store, log, _ = rated
    items = _item_hashes(store)
    overall: dict[str, list[float]] = {}
    for _r, u, _s, _k, v, _ in log:
        overall.setdefault(u, []).append(v)
    # A metric that is minus the experts' mean per item: Spearman's rho must be exactly -1.
    path = tmp_path / "m.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["key", "realism_metric", "unused"])
        for u, (sha, _src) in items.items():
            w.writerow([sha, -round(float(np.mean(overall[u])), 9), ""])
        w.writerow(["f" * 64, 1.0, ""])  # matches nothing
        # Per set: a FID-like metric, lower for the better-rated source.
        w.writerow([REAL, 5.0, ""])
        w.writerow([MODELS[0], 20.0, ""])
        w.writerow([MODELS[1], 40.0, ""])
    a = analyse(store, "s1", metrics=load_metrics(path))
    item = next(c for c in a.correlations if (c.level, c.metric, c.target) == ("item", "realism_metric", OVERALL))
    assert (item.n, item.rho) == (27, pytest.approx(-1.0))
    per_set = next(c for c in a.correlations if (c.level, c.target) == ("set", OVERALL))
    assert (per_set.n, per_set.rho) == (3, pytest.approx(-1.0))
    assert a.unmatched_metric_keys == ["f" * 64]


def test_metrics_file_formats(tmp_path):
    h = "a" * 64
    (tmp_path / "long.csv").write_text(f"key,metric,value\n{h},fid,1.5\nmodel-x,fid,20\n")
    (tmp_path / "nested.json").write_text(json.dumps({"items": {h: {"fid": 1.5}}, "sets": {"model-x": {"fid": 20}}}))
    (tmp_path / "flat.json").write_text(json.dumps({h.upper(): 1.5, "model-x": 20}))
    for name, metric in (("long.csv", "fid"), ("nested.json", "fid"), ("flat.json", "flat")):
        m = load_metrics(tmp_path / name)
        assert m.items == {h: {metric: 1.5}} and m.sets == {"model-x": {metric: 20.0}}, name
    (tmp_path / "bad.csv").write_text(f"key,fid\n{h},lots\n")
    with pytest.raises(StudyError, match="not a number"):
        load_metrics(tmp_path / "bad.csv")
    (tmp_path / "nokey.csv").write_text("hash,fid\n")
    with pytest.raises(StudyError, match="'key'"):
        load_metrics(tmp_path / "nokey.csv")


def _csv(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _forbidden(store, sources_dir):
    out = {REAL, *MODELS, str(sources_dir), "GENFILE", "c0ffee", "zebra", "generated"}
    for sha, psha in store.db.execute("SELECT sha256, pixel_sha256 FROM items"):
        out |= {sha, psha, sha[:10]}
    return out


def test_blinded_exports_hold_nothing_that_unblinds(rated, tmp_path):
    store, _, tmp = rated
    files = export_study(store, "s1", tmp_path / "b", fmt="all")
    assert {p.name for p in files} >= {"s1_blinded_ratings.csv", "s1_blinded.json", "s1_blinded_summary.csv"}
    forbidden = _forbidden(store, tmp / "sources")
    for p in files:
        text = p.read_text()
        assert not [s for s in forbidden if s in text], p.name
        assert '"truth"' not in text and "truth," not in text and '"turing":' not in text
    doc = json.loads((tmp_path / "b" / "s1_blinded.json").read_text())
    assert {s["label"] for s in doc["analysis"]["sources"]} == {"Source A", "Source B", "Source C"}
    assert doc["analysis"]["raters"] == ["R1", "R2"]
    rows = _csv(tmp_path / "b" / "s1_blinded_ratings.csv")
    assert len(rows) == 2 * 27 * 5 and {r["rater"] for r in rows} == {"R1", "R2"}


def test_unblinded_exports_are_the_owners(rated, tmp_path):
    store, _, _ = rated
    with pytest.raises(StudyError, match="owner"):
        export_study(store, "s1", tmp_path, blinded=False, owner="ann")
    with pytest.raises(StudyError, match="owner"):
        export_study(store, "s1", tmp_path, blinded=False)
    files = {p.name: p for p in export_study(store, "s1", tmp_path, fmt="all", blinded=False, owner="olivia")}
    turing = _csv(files["s1_unblinded_turing.csv"])
    assert turing[0]["rater"] == "all" and turing[0]["accuracy_k"] == "45"
    items = _csv(files["s1_unblinded_items.csv"])
    assert {r["source"] for r in items if r["role"] == "rated"} == {REAL, *MODELS}
    assert all(re.fullmatch(r"[0-9a-f]{64}", r["sha256"]) for r in items)
    doc = json.loads(files["s1_unblinded.json"].read_text())
    assert "secret" not in json.dumps(doc["study"])  # the HMAC key never leaves the store


def test_html_report_blinded_and_unblinded(rated):
    store, _, tmp = rated
    blind = render_report(store, "s1")
    forbidden = _forbidden(store, tmp / "sources")
    assert not [s for s in forbidden if s in blind]
    assert "Blinded report" in blind and "Visual Turing test" not in blind
    # Self-contained: plots inline, nothing fetched, no scripts.
    assert len(re.findall(r'<img alt="[^"]*" src="data:image/png;base64,', blind)) >= 2
    assert not re.search(r"(src|href)=\"(http|/|\.)", blind) and "<script" not in blind
    with pytest.raises(StudyError, match="owner"):
        render_report(store, "s1", blinded=False, owner="bob")
    full = render_report(store, "s1", blinded=False, owner="olivia")
    assert "Unblinded report" in full and "Visual Turing test" in full
    assert REAL in full and MODELS[0] in full
