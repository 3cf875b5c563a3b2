"""bench/precision_fid.py: its bootstrap FID (an n x n eigenproblem per resample) is the library's FID."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from histolab.evaluation.metrics import frechet_distance

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_precision_fid", ROOT / "bench" / "precision_fid.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


def library_fid(real, gen):
    return frechet_distance(real.mean(0), np.cov(real, rowvar=False), gen.mean(0), np.cov(gen, rowvar=False))


@pytest.mark.parametrize("n_gen", [20, 90])  # fewer and more images than dimensions
def test_bootstrap_fid_equals_the_library_fid(bench, n_gen):
    rng = np.random.default_rng(0)
    real = rng.normal(size=(120, 48)) @ rng.normal(size=(48, 48))
    gen = rng.normal(0.3, 1.2, size=(n_gen, 48)) @ rng.normal(size=(48, 48))
    fb = bench.FidBootstrap(real)
    proj = fb.project(gen)
    assert fb.fid(proj) == pytest.approx(
        library_fid(real, gen), rel=1e-6
    )  # eigenvalue rounding near 0, amplified by the square root
    idx = rng.integers(0, n_gen, n_gen)
    assert fb.fid(proj, idx) == pytest.approx(
        library_fid(real, gen[idx]), rel=1e-6
    )  # eigenvalue rounding near 0, amplified by the square root


def test_interval_keeps_the_spread_and_removes_the_bias(bench):
    xs = np.linspace(10.0, 20.0, 1001)  # bootstrap values centred on 15, the estimate is 12: bias +3
    lo, hi = (float(v) for v in bench.interval(12.0, xs).strip("[]").split(","))
    assert lo == pytest.approx(10.25 - 3, abs=0.01) and hi == pytest.approx(19.75 - 3, abs=0.01)
