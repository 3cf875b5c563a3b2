"""`python -m histolab train` and `python -m histolab jobs`: presets, one-line errors, a foreground run
recorded as a job, resume from the folder alone."""

import argparse
import json

from training_testkit import tiny_base_dir  # noqa: F401

from histolab.cli import build_parser, main
from histolab.training.presets import PRESETS

QUICK_SET = [
    "--set", "max_images_per_class=4", "--set", "min_images_per_class=2", "--set", "repeats=1",
    "--set", "batch_size=4", "--set", "validation=none", "--set", "samples_per_class=1", "--set", "sample_steps=1",
]  # fmt: skip


def test_every_option_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("train", "jobs"):
        for action in sub.choices[name]._actions:
            if action.dest != "help":
                assert action.help and action.help.strip(), f"{name} {action.dest} has no help"


def test_list_and_show_presets(capsys):
    assert main(["train", "--list-presets"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in PRESETS) and len(out.strip().splitlines()) == len(PRESETS)
    assert main(["train", "--show-preset", "uni2h-2026-lr-ratio-20x"]) == 0
    out = capsys.readouterr().out
    assert "projector_lr = 0.001  # Kuzmin & Berezsky 2026" in out and "lr ratio 20x" in out


def test_bad_settings_give_one_line_and_exit_2(capsys, paths, tmp_path):
    assert main(["train", "--preset", "tiny-lora", "--out", str(tmp_path / "o"), "--set", "rank=0"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: `rank` must be a positive integer but is 0"
    assert main(["train", "--preset", "no-such", "--out", str(tmp_path / "o")]) == 2
    assert "unknown preset 'no-such'" in capsys.readouterr().err
    assert main(["train", "--preset", "tiny-lora"]) == 2
    assert "--out is required" in capsys.readouterr().err


def test_foreground_run_is_a_job_and_resumes_from_its_folder(capsys, paths, tiny_base_dir, tmp_path):  # noqa: F811
    out = tmp_path / "ck" / "tiny-ti"
    args = ["train", "--method", "ti", "--preset", "tiny-ti", "--base", str(tiny_base_dir), "--data", "bundled"]
    assert main([*args, "--out", str(out), "--max-steps", "4", *QUICK_SET]) == 0
    text = capsys.readouterr().out
    assert "step 4/4" in text and f"done: 4 steps, 2 epochs; {out} holds the last epoch (2)" in text
    assert (out / "manifest.json").is_file() and (out / "learned_embeds.safetensors").is_file()
    # Recorded as a job: listed from disk with its final progress.
    assert main(["jobs", "list", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 1 and rows[0]["state"] == "done" and rows[0]["method"] == "textual_inversion"
    assert rows[0]["progress"]["step"] == 4 and rows[0]["out"] == str(out)
    # The same folder again without --resume is refused; with --resume alone it takes the saved settings.
    assert main([*args, "--out", str(out), "--max-steps", "4", *QUICK_SET]) == 2
    assert "already holds a training run" in capsys.readouterr().err
    assert main(["train", "--out", str(out), "--resume"]) == 0
    assert "done: 4 steps" in capsys.readouterr().out
    assert main(["jobs", "status", rows[0]["id"]]) == 0
    assert "done" in capsys.readouterr().out
    assert main(["jobs", "log", rows[0]["id"], "--lines", "3"]) == 0
    assert "done: 4 steps" in capsys.readouterr().out
