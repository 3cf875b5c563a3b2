"""`accelerate launch` with two processes (gloo on the CPU) runs the same command unchanged: each process
trains its share of every batch, one writes the checkpoints."""

import os
import subprocess
import sys
from pathlib import Path

from training_testkit import tiny_base_dir  # noqa: F401

from histolab.adapters.loader import locate, open_located
from histolab.adapters.manifest import read_manifest

ROOT = Path(__file__).resolve().parents[1]
# The `accelerate` console script imports torchvision (through timm) before histolab can repair it on a
# CPU build of torch; entering it through python after `import histolab` avoids that.
LAUNCHER = (
    "import sys, histolab; from accelerate.commands.accelerate_cli import main; sys.argv[0] = 'accelerate'; main()"
)


def test_two_process_launch_trains_and_checkpoints_once(tiny_base_dir, tmp_path):  # noqa: F811
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HISTOLAB_JOBS": str(tmp_path / "jobs")}
    sets = ["max_images_per_class=4", "min_images_per_class=2", "repeats=1", "batch_size=2", "validation=none",
            "samples_per_class=1", "sample_steps=1", "augment=none"]  # fmt: skip
    cmd = [sys.executable, "-c", LAUNCHER, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
           "-m", "histolab", "train", "--preset", "tiny-lora", "--base", str(tiny_base_dir), "--out", str(out),
           "--max-steps", "6", *[a for s in sets for a in ("--set", s)]]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    # 12 images, 2 per process per step: 4 per step, 3 steps per epoch.
    assert "12 images x 1 repeats, 4 images per step: 3 steps per epoch, 6 steps (2 epochs)" in run.stdout
    assert run.stdout.count("starting lora training") == 1  # only the main process logs
    m = read_manifest(out)
    assert m.training["processes"] == 2 and m.training["step"] == 6
    assert sorted(p.name for p in (out / "epochs").iterdir()) == ["epoch-001", "epoch-002"]
    assert open_located(locate(out)).kind == "lora"
    assert not (tmp_path / "jobs").exists()  # the launcher is the job: no job records from the processes
