"""Measure the embedded base model's FID against held-out real crops.

    python scripts/evaluate_embedded_base.py --split test [--guidance 3.0] [--random-init] [--floor]
    python scripts/evaluate_embedded_base.py --split val --state .cache/base-train/unet_state_8000.pt --guidance 2 3 5

For each bundled class, ``--per-class`` images are generated from the class
prompt (histolab.data.prompts.CLASS_PROMPTS, the caption the model saw most for
that class) with seeds 0.., and compared with the balanced held-out protocol
(``bundled:<split>``: 150 crops per class on a stride-8 grid, seed 0) in the
FID Inception space, overall and per class. Beside it, in the same run:
``--random-init`` (the same architecture with random weights) and ``--floor``
(real training crops, ``bundled:train``, against the same held-out crops: the
best a model can do at this sample size). Checkpoint and guidance are chosen on
``--split val``; the number reported is then measured once on ``--split test``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from histolab.data.prompts import CLASS_PROMPTS  # noqa: E402
from histolab.evaluation.evaluate import EvalConfig  # noqa: E402
from histolab.evaluation.extractors import get_extractor  # noqa: E402
from histolab.evaluation.images import open_image_set  # noqa: E402
from histolab.evaluation.validation import ValidationReference, validation_metrics  # noqa: E402
from histolab.generation import GenerationRequest, generate  # noqa: E402

CONFIG = EvalConfig(per_class=True, kid_subsets=100)


def generate_classes(model, per_class: int, guidance: float, steps: int, scheduler: str, batch: int = 25):
    images, labels = [], []
    for ci, (label, prompt) in enumerate(sorted(CLASS_PROMPTS.items())):
        for start in range(0, per_class, batch):
            n = min(batch, per_class - start)
            req = GenerationRequest(
                prompt=prompt,
                guidance_scale=guidance,
                steps=steps,
                scheduler=scheduler,
                batch_size=n,
                seed=ci * 100_000 + start,
            )
            images += [g.image for g in generate(model, req)]
            labels += [label] * n
    return images, labels


def summarise(name: str, m: dict) -> dict:
    keys = ["inception/fid", "inception/kid_mean", "inception/kid_std", "inception/precision", "inception/recall"]
    row = {k.split("/")[-1]: m.get(k) for k in keys}
    for label in sorted(CLASS_PROMPTS):
        row[f"fid_{label}"] = m.get(f"inception/{label}/fid")
    cls = "  ".join(f"{lab}={row[f'fid_{lab}']:.1f}" for lab in sorted(CLASS_PROMPTS))
    print(
        f"{name:<34} FID {row['fid']:8.2f}  KIDx1000 {1000 * row['kid_mean']:.2f}±{1000 * row['kid_std']:.2f}"
        f"  P {row['precision']:.3f} R {row['recall']:.3f}   {cls}",
        flush=True,
    )
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", choices=["val", "test"], default="val")
    ap.add_argument("--base", default="embedded", help="base model to measure (load_base source)")
    ap.add_argument("--state", type=Path, help="a train_base U-Net checkpoint to measure instead (EMA weights)")
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "base-train", help="train_base work dir")
    ap.add_argument("--guidance", type=float, nargs="+", default=[3.0])
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--scheduler", default="dpmpp_2m_karras")
    ap.add_argument("--per-class", type=int, default=150)
    ap.add_argument("--random-init", action="store_true", help="also measure random weights of the same shape")
    ap.add_argument("--floor", action="store_true", help="also measure real training crops (the floor)")
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "eval-base")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    args.cache.mkdir(parents=True, exist_ok=True)

    inception = get_extractor("inception")
    t0 = time.time()
    ref = ValidationReference.build(
        open_image_set(f"bundled:{args.split}"), [inception], cache_path=args.cache / f"{args.split}.safetensors"
    )
    print(f"held-out real: bundled:{args.split}, {time.time() - t0:.0f}s", flush=True)
    results: dict = {"split": args.split, "per_class": args.per_class, "steps": args.steps, "runs": {}}

    def measure(name, images, labels=None):
        m = validation_metrics(ref, images, labels=labels, config=CONFIG)
        results["runs"][name] = summarise(name, m)

    if args.floor:
        measure("floor: real train crops", open_image_set("bundled:train"))

    models = []
    if args.state:
        from histolab.embedded.train_base import model_from_state

        models.append((f"state {args.state.name}", model_from_state(args.work, args.state)))
    else:
        from histolab.pipeline import load_base

        models.append((args.base, load_base(args.base)))
    if args.random_init:
        from histolab.embedded.random_init import random_base

        models.append(("random init (same shape)", random_base("embedded", seed=0)))

    for name, model in models:
        for g in args.guidance:
            t0 = time.time()
            imgs, labels = generate_classes(model, args.per_class, g, args.steps, args.scheduler)
            measure(f"{name} g={g:g}", imgs, labels)
            print(f"  ({len(imgs)} images generated and measured in {time.time() - t0:.0f}s)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
