"""`python -m histolab reproduce`: each paper's plan with its numbers (--dry-run), and each paper's pipeline end
to end at --smoke scale on the embedded base and the bundled data, stopped after its first stage (the
deterministic stand-in for a kill) and resumed without redoing what was recorded."""

import csv
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from histolab.cli import main
from histolab.reproduce.plan import Plan, build_plan
from histolab.reproduce.processes import Processes
from histolab.reproduce.run import STATE_NAME, Reproduction, State, dataset_counts

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


def test_process_roles_main_writes_the_state_and_the_others_read_its_choice(tmp_path):
    """Two processes as two threads with a shared barrier: each runs the "all" stages, only the main one runs
    the "main" stages and writes the state file; the other reads the choice back after the barrier."""
    plan = Plan("cxr-2025", [], "last", "caption", (), [], {})
    barrier = threading.Barrier(2, timeout=120)
    calls: dict[int, list[str]] = {0: [], 1: []}
    got: dict[int, tuple] = {}

    def process(rank: int) -> None:
        rep = Reproduction(
            plan, base="embedded", data="bundled", out=tmp_path, log=None, processes=Processes(rank, 2, barrier.wait)
        )
        trained = rep._stage("train:x", lambda: calls[rank].append("train") or {"by": rank})
        chosen = rep._stage("select", lambda: calls[rank].append("select") or ["x"], who="main")
        got[rank] = (trained, chosen)

    threads = [threading.Thread(target=process, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert calls == {0: ["train", "select"], 1: ["train"]}
    assert got[1] == ({"by": 1}, ["x"]) and got[0] == ({"by": 0}, ["x"])
    assert json.loads((tmp_path / STATE_NAME).read_text())["done"] == {"train:x": {"by": 0}, "select": ["x"]}
    # A process that does not write keeps its record in memory only.
    other = State(tmp_path / "quiet", "cxr-2025", {}, write=False)
    other.record("train:x", 1)
    assert other.done("train:x") == 1 and not (tmp_path / "quiet" / STATE_NAME).exists()


def test_generations_are_split_between_processes_without_overlap():
    shares = [set(Processes(r, 3).owned(10)) for r in range(3)]
    assert set().union(*shares) == set(range(10)) and sum(map(len, shares)) == 10
    assert list(Processes().owned(4)) == [0, 1, 2, 3]


LAUNCHER = (
    "import sys, histolab; from accelerate.commands.accelerate_cli import main; sys.argv[0] = 'accelerate'; main()"
)


@pytest.mark.slow
def test_two_process_launch_reproduces_with_one_writer(tmp_path):
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "uni"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root), "HISTOLAB_JOBS": str(tmp_path / "jobs")}
    cmd = [sys.executable, "-c", LAUNCHER, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29547",
           "-m", "histolab", "reproduce", "uni2h-2026", "--smoke", "--device", "cpu", "--out", str(out),
           "--only-runs", "baseline"]  # fmt: skip
    run = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert run.stdout.count("reproduce uni2h-2026 (smoke scale)") == 1  # the plan, from the main process only
    assert "2 process(es)" in run.stdout  # the training runs used both
    assert run.stdout.count("best configuration by validation FID") == 1
    made = sorted(p.name for p in (out / "generated").rglob("*.png"))
    assert made == [f"{k:05d}.png" for k in range(12)]  # both shares, no gap, no duplicate
    state = json.loads((out / STATE_NAME).read_text())
    assert "table" in state["done"] and (out / "table.csv").exists()
