"""bench/training.py: the GPU code path (projector trainer, UNI2-h-family encoder, bf16 asked for) smoke-run
on the CPU at tiny scale; no timings are checked."""

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_path_smoke_on_cpu(capsys):
    spec = importlib.util.spec_from_file_location("bench_training", ROOT / "bench" / "training.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    try:
        spec.loader.exec_module(bench)
        assert bench.main(["--gpu-smoke", "--steps", "2", "--warmup", "1", "--threads", "2"]) == 0
    finally:
        sys.modules.pop(spec.name, None)
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("GPU path at tiny scale on the CPU"))
    r = json.loads(line.split("not a measurement): ", 1)[1])
    assert r["device"] == "cpu" and r["batch"] == 4 and r["step_s"] > 0 and r["samples_per_s"] > 0
