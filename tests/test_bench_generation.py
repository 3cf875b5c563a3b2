"""bench/generation.py: the GPU code path, smoke-run on CPU at tiny scale (no timings are checked)."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_generation", ROOT / "bench" / "generation.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


def test_sd15_compute_floor_from_the_issue_constants(bench):
    s = bench.parse_args(["--profile", "gpu", "--device", "cpu"])
    assert (s.arch, s.size, s.steps, s.batch_sizes, s.dtypes) == ("sd15", 512, 30, (1, 8), ("float16", "bfloat16"))
    floor, source = bench.floor_seconds_per_image(s, model=None)
    assert source == "issue constants"
    assert floor == pytest.approx((30 * 2 * 0.86 + 2.5) / 989, rel=1e-12)
    assert 0.054 < floor < 0.056  # "at least about 55 ms per image"


def test_gpu_path_smoke_on_cpu(bench, capsys):
    argv = ["--profile", "gpu", "--device", "cpu", "--arch", "tiny", "--size", "32", "--steps", "2"]
    argv += ["--repeats", "1", "--batch-sizes", "1,2", "--dtypes", "float32,bfloat16", "--threads", "2"]
    assert bench.main([*argv, "--layout-calls", "2"]) == 0
    out = capsys.readouterr().out
    assert "not GPU figures" in out
    assert out.count("compute floor:") == 2 and "FlopCounterMode" in out
    num = r"\s+([\d.]+)"
    rows = re.findall(rf"^\s+(\d+)\s+(\S+){num * 5}\s+(\d+){num}%$", out, re.M)
    assert len(rows) == 12  # 2 dtypes x 2 batch sizes x 3 variants
    assert [r[1] for r in rows[:3]] == ["diffusers", "engine", "engine+channels_last"]
    for i in range(0, 12, 3):
        base = float(rows[i][2])
        for bs, label, secs, ips, ratio, *_, diff, _ in rows[i : i + 3]:
            # Seconds are printed with 3 decimals: allow that rounding on top of 2%.
            rel = 0.02 + 0.0005 / float(secs)
            assert float(ips) == pytest.approx(int(bs) / float(secs), rel=rel, abs=0.01)
            assert float(ratio) == pytest.approx(base / float(secs), rel=rel + 0.0005 / base, abs=0.01)
            if label == "engine" and i < 6:  # float32: the engine does diffusers' work, pixel for pixel
                assert int(diff) <= 2, "engine and diffusers disagree on the same seeds"
    assert out.count("U-Net pass (batch") == 4 and out.count("VAE decode (1 image)") == 4
