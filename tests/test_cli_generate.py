"""``python -m histolab generate``: options, outputs, re-running a PNG, resume, one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histolab.cli import build_parser, main
from histolab.cli.generate import build_request, parse_adapter
from histolab.generation import AdapterSpec
from histolab.recipe import read_recipe

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """The tiny seeded model saved as a diffusers folder, loadable with --base."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from histolab.embedded.random_init import random_base

    m = random_base("tiny", seed=0)
    pipe = StableDiffusionPipeline(
        vae=m.vae,
        text_encoder=m.text_encoder,
        tokenizer=m.tokenizer,
        unet=m.unet,
        scheduler=PNDMScheduler.from_config(m.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out = tmp_path_factory.mktemp("models") / "tiny-base"
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def cli(*args):
    return main(["generate", *map(str, args)])


def common(base_dir):
    return ["--base", base_dir, "--steps", 2, "--guidance", 3.0, "--quiet"]


def test_every_option_is_documented():
    sub = build_parser()._subparsers._group_actions[0].choices["generate"]
    for action in sub._actions:
        if action.dest != "help":
            assert action.help and len(action.help) > 10, action.dest
    names = {s for a in sub._actions for s in a.option_strings}
    for field in ("--prompt", "--negative-prompt", "--guidance", "--steps", "--scheduler", "--width", "--height"):
        assert field in names
    for opt in ("--batch-size", "--n", "--seed", "--base", "--adapter", "--reference", "--device", "--dtype"):
        assert opt in names
    for opt in ("--resume", "--from-png", "--out"):
        assert opt in names


def test_generate_writes_pngs_and_recipes(base_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli(
        "--base", base_dir, "--steps", 2, "--guidance", 3.0, "--prompt", "h&e stained colon", "--negative-prompt",
        "blurry", "--scheduler", "euler_a", "--n", 3, "--batch-size", 2, "--seed", 7, "--out", out,
    )  # fmt: skip
    assert rc == 0
    err = capsys.readouterr().err
    assert "[3/3]" in err  # progress on stderr
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["000000-seed7.png", "000001-seed8.png", "000002-seed9.png"]
    rows = [json.loads(x) for x in (out / "recipes.jsonl").read_text().splitlines()]
    assert [r["file"] for r in rows] == names
    r = read_recipe(out / names[1])
    assert (r.prompt, r.negative_prompt, r.scheduler, r.steps, r.guidance_scale, r.seed) == (
        "h&e stained colon", "blurry", "euler_a", 2, 3.0, 8,
    )  # fmt: skip
    assert (r.width, r.height, r.base_model) == (32, 32, "tiny-base")
    assert rows[1]["recipe"] == r.to_dict()


def test_from_png_reproduces_the_pixels(base_dir, tmp_path):
    first = tmp_path / "first"
    assert cli(*common(base_dir), "--prompt", "tumour tissue", "--n", 2, "--seed", 20, "--out", first) == 0
    png = first / "000001-seed21.png"
    again = tmp_path / "again"
    assert cli("--base", base_dir, "--quiet", "--from-png", png, "--out", again) == 0
    (made,) = list(again.glob("*.png"))
    assert made.name == "000000-seed21.png"
    assert made.read_bytes() == png.read_bytes()  # same pixels, same recipe
    # An option given with --from-png overrides the recipe.
    other = tmp_path / "other"
    assert cli("--base", base_dir, "--quiet", "--from-png", png, "--steps", 3, "--out", other) == 0
    r = read_recipe(next(other.glob("*.png")))
    assert (r.steps, r.prompt, r.seed) == (3, "tumour tissue", 21)
    assert not np.array_equal(np.asarray(Image.open(next(other.glob("*.png")))), np.asarray(Image.open(png)))


def test_resume_through_the_cli(base_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(*common(base_dir), "--prompt", "skin", "--n", 2, "--out", out) == 0
    capsys.readouterr()
    assert cli(*common(base_dir), "--prompt", "skin", "--n", 4, "--out", out) == 2
    assert "pass --resume to continue it" in capsys.readouterr().err
    assert cli(*common(base_dir), "--prompt", "skin", "--n", 4, "--out", out, "--resume") == 0
    assert "made 2, 2 were already there" in capsys.readouterr().out
    assert len(list(out.glob("*.png"))) == 4
    assert cli(*common(base_dir), "--prompt", "other", "--n", 4, "--out", out, "--resume") == 2
    assert "request.prompt: 'skin' there, 'other' now" in capsys.readouterr().err


def test_adapter_specs():
    assert parse_adapter("checkpoints/my-lora:0.5") == AdapterSpec("checkpoints/my-lora", 0.5)
    assert parse_adapter("my-lora") == AdapterSpec("my-lora", 1.0)
    assert parse_adapter("C:\\loras\\x") == AdapterSpec("C:\\loras\\x", 1.0)
    assert parse_adapter("C:\\loras\\x:-0.25") == AdapterSpec("C:\\loras\\x", -0.25)
    args = build_parser().parse_args(
        ["generate", "--prompt", "p", "--adapter", "a:0.5", "--adapter", "b", "--out", "x", "--batch-size", "3"]
    )
    req = build_request(args)
    assert req.adapters == (AdapterSpec("a", 0.5), AdapterSpec("b", 1.0))
    assert (req.prompt, req.batch_size, req.mode) == ("p", 3, "prompt")
    ref = Image.new("RGB", (8, 8), (200, 100, 150))
    req = build_request(args, reference=ref)
    assert req.mode == "reference" and req.reference is ref


def test_reference_mode_without_a_projector_is_a_clear_error(base_dir, tmp_path, capsys):
    patch = tmp_path / "patch.png"
    Image.new("RGB", (32, 32), (180, 90, 160)).save(patch)
    out = tmp_path / "ref"
    assert cli(*common(base_dir), "--reference", patch, "--out", out) == 2
    assert "reference mode needs a foundation-embedding adapter" in capsys.readouterr().err
    assert not out.exists()  # a run that failed before its first image leaves no folder to --resume


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "x", "--steps", "0"], "error: `steps` must be an integer from 1 to 1000 but is 0"),
        (["--prompt", "x", "--width", "34"], "have to be divisible by 4 but are 32 and 34"),
        (["--prompt", "x", "--guidance", "-2"], "error: `guidance_scale` must be >= 0 but is -2.0"),
        (["--prompt", "x", "--n", "0"], "error: the number of images must be from 1 to"),
        (["--prompt", "x", "--base", "no/such-model.safetensors"], "error: no model at 'no/such-model.safetensors'"),
        (["--from-png", "missing.png"], "error: --from-png 'missing.png': no such file"),
        (["--prompt", ""], "error: --prompt is empty"),
    ],
)
def test_errors_are_one_line_and_exit_2(base_dir, tmp_path, capsys, args, message):
    if "--base" not in args:
        args += ["--base", str(base_dir)]
    rc = cli(*args, "--quiet", "--out", tmp_path / "o")
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err
    assert err.count("\n") == 1 and err.startswith("error: ")


def test_module_entry_point(base_dir, tmp_path):
    """`python -m histolab generate` in a fresh process: exit codes and streams as a user sees them."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, "-m", "histolab", "generate", "--base", str(base_dir), "--steps", "2"]
    ok = subprocess.run([*cmd, "--prompt", "skin", "--n", "2", "--out", str(tmp_path / "o")], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "[2/2]" in ok.stderr and "recipes.jsonl" in ok.stdout
    bad = subprocess.run([*cmd, "--prompt", "skin", "--scheduler", "k_fancy", "--out", str(tmp_path / "p")], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 2 and "invalid choice: 'k_fancy'" in bad.stderr


def test_accelerate_launch_two_processes_equals_one(base_dir, tmp_path):
    """A real `accelerate launch` of 2 processes (gloo on CPU) makes the single-process folder, byte for byte."""
    import torch

    single = tmp_path / "single"
    args = ["--base", base_dir, "--prompt", "skin", "--n", 5, "--steps", 2, "--seed", 5, "--quiet"]
    # CPU kernels split their sums by thread, so bits match at equal thread counts: one here, one per process there.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli(*args, "--batch-size", 3, "--out", single) == 0
    finally:
        torch.set_num_threads(threads)
    # `python -m histolab.launch` is `accelerate launch` with histolab's torchvision repair in place
    # (the plain console script imports timm, hence torchvision, first and fails on CPU torch).
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    split = tmp_path / "split"
    run = subprocess.run(
        [sys.executable, "-m", "histolab.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
         "-m", "histolab", "generate", *map(str, args), "--batch-size", "2", "--out", str(split)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "5 images asked for; this process made 3" in run.stdout  # the main process: indices 0, 2, 4
    assert {p.name: p.read_bytes() for p in split.iterdir()} == {p.name: p.read_bytes() for p in single.iterdir()}
