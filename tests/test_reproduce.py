"""`python -m histolab reproduce`: each paper's plan with its numbers (--dry-run), and each paper's pipeline end
to end at --smoke scale on the embedded base and the bundled data, stopped after its first stage (the
deterministic stand-in for a kill) and resumed without redoing what was recorded."""

import csv
import json

import pytest

from histolab.cli import main
from histolab.reproduce.plan import build_plan
from histolab.reproduce.run import STATE_NAME, dataset_counts

COUNTS = {"train": {"a": 100, "b": 50}, "val": {"a": 10, "b": 5}, "test": {"a": 20, "b": 10}}


def test_colon_plan_is_one_model_per_class_with_the_papers_numbers():
    plan = build_plan("colon-2025", COUNTS)
    assert len(plan.runs) == 4 * 2 and plan.select == "last"
    db = next(r for r in plan.runs if r.id == "dreambooth-a")
    cfg = db.config()
    assert (cfg.only_classes, cfg.repeats, cfg.batch_size, cfg.seed, cfg.optimizer) == ("a", 2, 2, 22, "adamw8bit")
    assert db.n_images == 110  # the whole class: train and validation images, nothing held out
    assert db.steps == -(-110 * 2 // 2) * 12
    hn = next(r for r in plan.runs if r.id == "hypernetwork-b")
    assert hn.steps == 4500 and hn.config().batch_size == 4


def test_uni2h_plan_is_the_twelve_configurations_chosen_by_validation_fid():
    plan = build_plan("uni2h-2026", COUNTS)
    assert len(plan.runs) == 12 and plan.select == "val-fid" and plan.test == "reference"
    base = plan.runs[0].config()
    assert (base.sample_scheduler, base.sample_steps, base.val_per_image, base.null_init_std) == (
        "ddpm",
        30,
        True,
        0.01,
    )
    assert plan.runs[0].n_images == 150 and plan.runs[0].steps == -(-150 // 16) * 12  # the train split


def test_dry_run_prints_every_papers_plan(capsys):
    for paper, runs in (("colon-2025", 12), ("uni2h-2026", 12), ("cxr-2025", 1)):
        assert main(["reproduce", paper, "--dry-run"]) == 0
        out = capsys.readouterr().out
        assert f"{runs} training runs" in out and "estimated GPU hours" in out
    assert main(["reproduce", "cxr-2025", "--dry-run"]) == 0
    assert "lr 5e-05, optimizer adam" in capsys.readouterr().out


def test_is_without_its_head_is_a_clear_error(tmp_path, capsys):
    assert main(["reproduce", "cxr-2025", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--inception-head" in err and "pt_inception-2015-12-05-6726825d.pth" in err


@pytest.mark.slow  # minutes each on a loaded 2-core machine (Inception on a CPU dominates)
@pytest.mark.parametrize(
    ("paper", "runs"),
    [("colon-2025", "lora-colon_ihc,ti-colon_ihc"), ("uni2h-2026", "baseline,rank4"), ("cxr-2025", "cxr")],
)
def test_smoke_end_to_end_with_a_stop_and_resume(paper, runs, tmp_path, capsys):
    out = tmp_path / paper
    cmd = ["reproduce", paper, "--smoke", "--device", "cpu", "--out", str(out), "--only-runs", runs]
    first = runs.split(",")[0]
    assert main([*cmd, "--stop-after", "1"]) == 3  # stopped after the first training run
    state = json.loads((out / STATE_NAME).read_text())
    assert list(state["done"]) == [f"train:{first}"]
    capsys.readouterr()
    assert main(cmd) == 0
    log = capsys.readouterr().out
    assert f"runs/{first} (" not in log  # the recorded run is not trained again
    rows = list(csv.DictReader((out / "table.csv").read_text().splitlines()))
    assert rows and all(r["FID"] for r in rows)
    assert all("±" in r["KID x1000"] for r in rows) and all(r["precision"] and r["recall"] for r in rows)
    assert (out / "table.md").read_text().startswith(f"# {paper} (smoke scale")
    assert (out / "fid_by_epoch.png").stat().st_size > 0
    if paper == "uni2h-2026":
        val = list(csv.DictReader((out / "table_validation.csv").read_text().splitlines()))
        assert {r["run"] for r in val} == {"baseline", "rank4"} and sum(r["chosen"] == "yes" for r in val) == 1
    if paper == "cxr-2025":
        assert all(r["IS"].startswith("not computed") for r in rows)
    state = json.loads((out / STATE_NAME).read_text())
    assert "table" in state["done"]
    assert main(cmd) == 0  # a finished reproduction reruns as a no-op


def test_dataset_counts_of_the_bundled_data():
    c = dataset_counts("bundled", None)
    assert set(c) == {"train", "val", "test"} and sum(c["test"].values()) > 0
