"""``python -m histolab study``: the worked example end to end with real generator output, and errors."""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_review_support import answers_for, make_sources, new_id, study_dict, write_config

from histolab.cli import build_parser, main
from histolab.review import Store, get_task, next_task, submit
from histolab.review.analysis import analyse

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "study.yaml"


def _study_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["study"]


def test_every_study_action_and_option_is_documented():
    study = _study_parser()
    actions = next(a for a in study._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in actions._choices_actions}
    assert set(helps) >= {"create", "status", "export", "report", "add-rater", "unblind", "list", "demo-data"}
    assert all(h and h.strip() for h in helps.values())
    for name, p in [("study", study), *actions.choices.items()]:
        for opt in p._actions:
            if isinstance(opt, argparse._HelpAction | argparse._SubParsersAction):
                continue
            assert opt.help and opt.help.strip(), f"{name}: {opt.dest} has no help"


def _rate_all(store, study_id, rater, rng, stop_after=None):
    n = 0
    while (task := next_task(store, study_id, rater)) is not None:
        if stop_after is not None and n >= stop_after:
            return task
        submit(store, study_id, rater, task.task_id, answers_for(task, rng), new_id())
        n += 1
    return None


@pytest.mark.slow
def test_example_study_end_to_end(tmp_path, tiny_model, capsys):
    from histolab.cli.demo_data import write_demo_sources

    shutil.copy(EXAMPLE, tmp_path / "study.yaml")
    # Generated sets from the real generator (a tiny seeded model, 1 step): PNGs with their recipes.
    write_demo_sources(tmp_path / "demo-data", per_class=2, references=1, model=tiny_model, steps=1)
    ann = tmp_path / "annotations"
    rc = main(
        [
            "study",
            "--annotations",
            str(ann),
            "create",
            "--config",
            str(tmp_path / "study.yaml"),
            "--codes",
            str(tmp_path / "codes.csv"),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "demo-turing: 24 tasks per rater" in out
    with open(tmp_path / "codes.csv", newline="") as fh:
        codes = {r["rater"]: r["code"] for r in csv.DictReader(fh)}
    assert set(codes) == {"path1", "path2", "path3"} and not any(c in out for c in codes.values())
    recipes = [
        json.loads(r) for (r,) in Store(ann).db.execute("SELECT recipe_json FROM items WHERE recipe_json IS NOT NULL")
    ]
    assert len(recipes) == 18 and {r["guidance_scale"] for r in recipes} == {2.0, 7.5, 12.0}

    # path1 rates half, the "server" restarts, path1 resumes at the very task it stopped at.
    rng = np.random.default_rng(0)
    store = Store(ann)
    pending = _rate_all(store, "demo-turing", "path1", rng, stop_after=12)
    store.close()
    store = Store(ann)
    resumed = next_task(store, "demo-turing", "path1")
    assert (resumed.task_id, resumed.position) == (pending.task_id, 13)
    _rate_all(store, "demo-turing", "path1", rng)
    _rate_all(store, "demo-turing", "path2", rng)
    assert get_task(store, "demo-turing", "path1", pending.task_id).answers is not None

    assert main(["study", "--annotations", str(ann), "status", "demo-turing"]) == 0
    status = capsys.readouterr().out
    assert "path1" in status and "24/24" in status and "0/24" in status

    # Metrics keyed by content hash (per item) and by source name (per set).
    items = list(Store(ann).db.execute("SELECT sha256, source FROM items"))
    metrics = {
        "items": {sha: {"sharpness": float(i)} for i, (sha, _) in enumerate(items)},
        "sets": {"cfg-2": {"fid": 30.0}, "cfg-7": {"fid": 20.0}, "cfg-12": {"fid": 25.0}, "real-test": {"fid": 0.0}},
    }
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))

    assert main(["study", "--annotations", str(ann), "export", "demo-turing"]) == 0
    exported = capsys.readouterr().out.split()
    assert all(Path(p).is_file() for p in exported) and any(p.endswith("demo-turing_blinded.json") for p in exported)
    assert all("/exports/demo-turing/" in p for p in exported)
    assert (
        main(["study", "--annotations", str(ann), "report", "demo-turing", "--out", str(tmp_path / "blind.html")]) == 0
    )
    args = ["report", "demo-turing", "--unblinded", "--owner", "alice", "--metrics", str(tmp_path / "metrics.json")]
    assert main(["study", "--annotations", str(ann), *args, "--out", str(tmp_path / "full.html")]) == 0
    capsys.readouterr()
    blind, full = (tmp_path / "blind.html").read_text(), (tmp_path / "full.html").read_text()
    assert "cfg-12" not in blind and "cfg-12" in full and "Visual Turing test" in full
    assert "Expert scores against metrics" in full and "sharpness" in full

    assert (
        main(
            [
                "study",
                "--annotations",
                str(ann),
                "unblind",
                "demo-turing",
                "--owner",
                "alice",
                "--out",
                str(tmp_path / "u.csv"),
            ]
        )
        == 0
    )
    with open(tmp_path / "u.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 * 24 and {r["source"] for r in rows} == {"real-test", "cfg-2", "cfg-7", "cfg-12"}

    a = analyse(Store(ann), "demo-turing")
    assert a.turing.accuracy.n == 48 and a.progress["path3"] == (0, 24)


def test_cli_errors_are_one_line(tmp_path, capsys):
    ann = ["study", "--annotations", str(tmp_path / "ann")]
    (tmp_path / "bad.yaml").write_text("id: x\nowner: o\nsources: []\n")
    assert main([*ann, "create", "--config", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "sources" in err
    assert main([*ann, "status", "nope"]) == 2
    assert "unknown study 'nope'" in capsys.readouterr().err
    assert main([*ann, "export", "nope", "--unblinded"]) == 2
    assert "--owner" in capsys.readouterr().err


def test_colonoscopy_protocol_from_the_cli(tmp_path, capsys):
    sources = make_sources(tmp_path)
    cfg = study_dict(sources, id="colon", template="colonoscopy", set_size=3)
    cfg["sources"].append({"name": "refsrc", "kind": "real", "role": "reference", "path": str(sources / "reference")})
    write_config(tmp_path / "colon.yaml", cfg)
    ann = ["study", "--annotations", str(tmp_path / "ann")]
    assert main([*ann, "create", "--config", str(tmp_path / "colon.yaml")]) == 0
    assert "10 tasks per rater" in capsys.readouterr().out  # 3 models x 3 prompts, then the ranking
    assert main([*ann, "add-rater", "colon", "cat"]) == 0
    store = Store(tmp_path / "ann")
    rng = np.random.default_rng(3)
    for r in ("ann", "bob", "cat"):
        _rate_all(store, "colon", r, rng)
    a = analyse(store, "colon")
    assert a.ranking.n_raters == 3 and sorted(a.ranking.mean_rank.values()) and a.ranking.kendall_w is not None
    assert {s.aspect for s in a.summaries} >= {"intra_set_diversity", "overall"}
    assert main([*ann, "report", "colon", "--out", str(tmp_path / "r.html")]) == 0
    html = (tmp_path / "r.html").read_text()
    assert "Ranking of the models" in html and "Model A" in html
    assert main([*ann, "close", "colon", "--owner", "olivia"]) == 0
    assert main([*ann, "list"]) == 0
    assert "colon\tclosed\tset" in capsys.readouterr().out
