"""FID of the CPU fast path's bfloat16 images against float32's, both against the same held-out crops.

    python bench/precision_fid.py [--per-class 100] [--bootstrap 1000]

The embedded base generates ``--per-class`` images per bundled class from the
class prompt (as scripts/evaluate_embedded_base.py does: histolab.data.prompts,
seeds ``class * 100000 + i``, 25 DPM++ 2M Karras steps, guidance 5) twice, with
the same seeds: in float32 (eager, the engine's float32 path) and in bfloat16
(``--dtype auto`` on a CPU with avx512_bf16/AMX: bfloat16 networks, traced
U-Net, float32 sampler) and once more in bfloat16 with the U-Net compiled ahead
of time (histolab.compiled_unet, the auto path once its packages are built;
built first where missing). Every set is compared with the held-out test crops
(``bundled:test``) in the FID Inception space (bundled weights).

Intervals: 95% bootstrap over the generated images (``--bootstrap`` resamples
of the image indices, the real crops held fixed), the percentiles shifted by
the bootstrap's bias (see ``interval``). The same resampled
indices are used for both dtypes, so image i of one set stays paired with image
i of the other (same seed and prompt), which gives the paired difference
FID(bf16) - FID(fp32) its own interval: if it holds 0, the dtypes agree within
the FID's own noise at this N. Also printed: the FID of two float32 sets with
different seeds (the noise of drawing another sample of the same model), and
the pixel difference between the paired images.

Each resample costs one n x n eigendecomposition, not a 2048 x 2048 one: with
S = C_real^1/2 fixed, Tr((C_real C_gen)^1/2) is the sum of square roots of the
eigenvalues of Y Y^T / (n - 1), Y the centred resampled features times S.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import histolab  # noqa: F401  (torchvision shim before diffusers)


class FidBootstrap:
    """FID of generated features against fixed real features, for any resampling of the generated rows."""

    def __init__(self, real: np.ndarray):
        real = np.asarray(real, np.float64)
        self.mu = real.mean(0)
        cov = np.cov(real, rowvar=False)
        w, v = np.linalg.eigh(cov)
        self.root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        self.trace_real = float(np.trace(cov))

    def project(self, gen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        gen = np.asarray(gen, np.float64)
        return gen, gen @ self.root

    def fid(self, projected: tuple[np.ndarray, np.ndarray], idx: np.ndarray | None = None) -> float:
        gen, g = projected
        if idx is not None:
            gen, g = gen[idx], g[idx]
        n = len(gen)
        mu = gen.mean(0)
        x = gen - mu
        y = g - g.mean(0)
        trace_gen = float((x * x).sum() / (n - 1))
        ev = np.linalg.eigvalsh((y @ y.T) / (n - 1))
        tr_covmean = float(np.sqrt(np.clip(ev, 0, None)).sum())
        d = self.mu - mu
        return max(float(d @ d) + self.trace_real + trace_gen - 2.0 * tr_covmean, 0.0)


def interval(point: float, xs: np.ndarray) -> str:
    """95% interval around ``point`` from the bootstrap's spread, shifted by its bias.

    FID is biased upward at finite n, and a resample with replacement repeats
    images (about 63% distinct), which raises it further: the raw percentiles
    of resampled FIDs lie above the full-sample FID (here by about 11). The
    spread is kept and the bias (bootstrap mean - point) taken off."""
    lo, hi = np.percentile(xs, [2.5, 97.5]) - (xs.mean() - point)
    return f"[{lo:.2f}, {hi:.2f}]"


BF16 = "bfloat16, traced U-Net"
COMPILED = "bfloat16, compiled U-Net"
BATCH = 25  # images per generate call


def generate_classes(model, per_class: int, guidance: float, steps: int, seed_offset: int = 0, batch: int = BATCH):
    from histolab.data.prompts import CLASS_PROMPTS
    from histolab.generation import GenerationRequest, generate

    images = []
    for ci, (_, prompt) in enumerate(sorted(CLASS_PROMPTS.items())):
        for start in range(0, per_class, batch):
            n = min(batch, per_class - start)
            req = GenerationRequest(
                prompt=prompt,
                guidance_scale=guidance,
                steps=steps,
                batch_size=n,
                seed=seed_offset + ci * 100_000 + start,
            )
            images += [g.image for g in generate(model, req)]
    return images


def features(extractor, images, batch: int = 50) -> np.ndarray:
    return np.concatenate([extractor.features(images[i : i + batch]) for i in range(0, len(images), batch)])


def main(argv=None) -> int:
    import torch

    from histolab.evaluation.extractors import get_extractor
    from histolab.evaluation.images import open_image_set
    from histolab.evaluation.metrics import frechet_distance
    from histolab.pipeline import load_base, optimize_for_inference
    from histolab.precision import detect_cpu_bf16

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=100, help="images per class and dtype (3 classes)")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the generated images")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=5.0, help="the embedded base's guidance (README)")
    ap.add_argument("--no-noise-set", dest="noise_set", action="store_false", help="skip the second float32 set")
    ap.add_argument(
        "--no-compiled", dest="compiled", action="store_false", help="skip the set made with the compiled U-Net"
    )
    args = ap.parse_args(argv)

    cpu = detect_cpu_bf16()
    print(f"bench/precision_fid.py torch={torch.__version__} threads={torch.get_num_threads()}; {cpu.describe()}")
    t0 = time.perf_counter()
    inception = get_extractor("inception")
    real_set = open_image_set("bundled:test")
    real = features(inception, [real_set.load(i) for i in range(len(real_set))])
    print(f"held-out real: bundled:test, {len(real)} crops ({time.perf_counter() - t0:.0f} s)", flush=True)

    runs = {}
    f32 = optimize_for_inference(load_base("embedded", dtype=torch.float32))
    bf16 = optimize_for_inference(load_base("embedded", dtype=torch.bfloat16), aot=False)
    plan = [("float32", f32, 0), (BF16, bf16, 0)]
    if args.compiled:
        compiled = optimize_for_inference(load_base("embedded", dtype=torch.bfloat16), aot=True)
        if compiled.compiled_unets is not None:
            from histolab.compiled_unet import app_shapes, build_missing

            t = time.perf_counter()
            built = build_missing(compiled, app_shapes(compiled, (min(BATCH, args.per_class),)), log=lambda s: None)
            print(
                f"compiled U-Net for batches of {BATCH}: {len(built)} package(s) built ({time.perf_counter() - t:.0f} s)"
            )
            plan.append((COMPILED, compiled, 0))
    if args.noise_set:
        plan.append(("float32, other seeds", f32, 50_000))
    for name, model, offset in plan:
        t = time.perf_counter()
        images = generate_classes(model, args.per_class, args.guidance, args.steps, offset)
        runs[name] = (images, features(inception, images))
        what = f"{model.optimizations}".replace("'", "")
        print(f"  {name}: {len(images)} images, {what} ({time.perf_counter() - t:.0f} s)", flush=True)

    a = np.stack([np.asarray(im, np.int16) for im in runs["float32"][0]])
    for name in (BF16, COMPILED):
        if name in runs:
            b = np.stack([np.asarray(im, np.int16) for im in runs[name][0]])
            diff = np.abs(a - b)
            print(
                f"pixels, {name} vs float32 (same seeds): mean |diff| {diff.mean():.2f} levels, "
                f"99th percentile {np.percentile(diff, 99):.0f}, max {diff.max()}"
            )

    fb = FidBootstrap(real)
    proj = {name: fb.project(feats) for name, (_, feats) in runs.items()}
    n = len(runs["float32"][1])
    rng = np.random.default_rng(0)
    boots = {name: [] for name in runs}
    for _ in range(args.bootstrap):
        idx = rng.integers(0, n, n)
        for name in runs:
            boots[name].append(fb.fid(proj[name], idx))
    boots = {k: np.asarray(v) for k, v in boots.items()}

    mu_r, cov_r = real.astype(np.float64).mean(0), np.cov(real.astype(np.float64), rowvar=False)
    print(
        f"\nFID against {len(real)} held-out crops, N = {n} generated images per dtype ({args.per_class} per class), "
        f"{args.steps} steps, guidance {args.guidance:g}; 95% bootstrap intervals over the generated images "
        f"({args.bootstrap} resamples, real crops fixed)"
    )
    point = {}
    for name, (_, feats) in runs.items():
        f = feats.astype(np.float64)
        point[name] = frechet_distance(mu_r, cov_r, f.mean(0), np.cov(f, rowvar=False))
        bias = boots[name].mean() - point[name]
        print(
            f"  {name:<34} FID {point[name]:8.2f}  95% CI {interval(point[name], boots[name])}  (bootstrap bias {bias:+.2f})"
        )
    for name in (BF16, COMPILED):
        if name in runs:
            d = boots[name] - boots["float32"]
            dp = point[name] - point["float32"]
            print(f"  paired difference {name} - float32: {dp:+.2f}  95% CI {interval(dp, d)}")
    if args.noise_set:
        dn = boots["float32, other seeds"] - boots["float32"]
        dnp = point["float32, other seeds"] - point["float32"]
        print(f"  for scale, float32 other seeds - float32: {dnp:+.2f}  95% CI {interval(dnp, dn)}")
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
