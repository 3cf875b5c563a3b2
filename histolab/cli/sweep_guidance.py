"""``python -m histolab sweep-guidance``: FID (and KID, precision/recall) by guidance scale."""

from __future__ import annotations

import sys
import time
from pathlib import Path

NAME = "sweep-guidance"
HELP = "Generate at a range of guidance scales and measure each against real images (FID by guidance)."


def add_arguments(p) -> None:
    p.add_argument("--model", default="embedded", help="base model: embedded, a diffusers folder, a file or a hub id")
    p.add_argument(
        "--real",
        default="bundled:val",
        help="real images to measure against: a folder, FILE.csv[@SPLIT] or bundled:SPLIT (default bundled:val)",
    )
    p.add_argument(
        "--mode",
        choices=("prompt", "reference"),
        default="prompt",
        help="prompt: text conditioning (scales around 7.5); reference: a reference patch through an encoder "
        "adapter (scales 1.0 to 2.0 step 0.1)",
    )
    p.add_argument("--scales", default=None, help="START:STOP:STEP (inclusive) or a comma list; default by mode")
    p.add_argument(
        "--prompt",
        default=None,
        help="one prompt for every class (default: each bundled class's own prompt when the real set has "
        "bundled classes, else required in prompt mode)",
    )
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="REF[:STRENGTH]",
        help="an adapter to apply (path or registry name, optional strength); repeat for several. Reference "
        "mode needs a foundation-embedding (projector) adapter",
    )
    p.add_argument("--references", default=None, help="reference patches for reference mode (default: the --real set)")
    p.add_argument("--n", type=int, default=50, help="images per class per scale (default 50)")
    p.add_argument("--steps", type=int, default=25, help="denoising steps (default 25)")
    p.add_argument("--scheduler", default="dpmpp_2m_karras", help="sampler (default dpmpp_2m_karras)")
    p.add_argument("--seed", type=int, default=0, help="base seed; the same seeds are used at every scale")
    p.add_argument("--batch-size", type=int, default=8, help="generation batch size (images do not depend on it)")
    p.add_argument("--features", default="inception", help="feature spaces, comma-separated (first one picks the best)")
    p.add_argument("--max-real", type=int, default=None, help="use at most this many real images (evenly spaced)")
    p.add_argument("--save-images", action="store_true", help="also write the generated images under OUT")
    p.add_argument("--out", default=None, help="output folder (default outputs/sweeps/<time>)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, ...)")


def _adapter(text: str):
    from histolab.errors import InvalidRequest
    from histolab.generation import AdapterSpec

    ref, sep, strength = text.rpartition(":")
    if sep and ref and not strength.replace(".", "", 1).lstrip("-").isdigit():
        ref, strength = text, ""
    if not sep or not ref:
        return AdapterSpec(text)
    try:
        return AdapterSpec(ref, float(strength)) if strength else AdapterSpec(ref)
    except ValueError:
        raise InvalidRequest(f"--adapter {text!r}: strength must be a number") from None


def run(args) -> int:
    from histolab.config import Paths
    from histolab.data.prompts import CLASS_PROMPTS
    from histolab.errors import InvalidRequest
    from histolab.evaluation.evaluate import EvalConfig
    from histolab.evaluation.extractors import get_extractor, parse_feature_names
    from histolab.evaluation.images import open_image_set
    from histolab.evaluation.sweep import SweepConfig, parse_scales, sweep_guidance
    from histolab.pipeline import load_base

    real = open_image_set(args.real, max_images=args.max_real)
    if args.prompt is not None:
        prompts = args.prompt
    elif real.classes and all(c in CLASS_PROMPTS for c in real.classes):
        prompts = {c: CLASS_PROMPTS[c] for c in real.classes}
    elif args.mode == "prompt":
        raise InvalidRequest("--prompt is needed: the real set's classes are not bundled classes with known prompts")
    else:
        prompts = ""
    config = SweepConfig(
        mode=args.mode,
        scales=parse_scales(args.scales) if args.scales else (),
        images_per_class=args.n,
        steps=args.steps,
        scheduler=args.scheduler,
        seed=args.seed,
        batch_size=args.batch_size,
        save_images=args.save_images,
        eval=EvalConfig(per_class=bool(real.classes), kid_subsets=20),
    )
    config.resolved_scales()
    extractors = [get_extractor(n, device=args.device) for n in parse_feature_names(args.features)]
    references = open_image_set(args.references) if args.references else None
    model = load_base(args.model, device=args.device)
    out = Path(args.out) if args.out else Paths.from_env().outputs / "sweeps" / time.strftime("%Y%m%d-%H%M%S")
    result = sweep_guidance(
        model,
        real,
        extractors,
        config,
        prompts=prompts,
        adapters=[_adapter(a) for a in args.adapter],
        references=references,
        out_dir=out,
        progress=lambda m: print(m, file=sys.stderr, flush=True),
    )
    key = result["best"]["by"]
    for row in result["rows"]:
        print(f"guidance {row['guidance']:>5g}  {key}={row.get(key, float('nan')):.4f}")
    print(f"best guidance: {result['best']['guidance']:g} ({key} {result['best']['value']:.4f})")
    print(f"wrote {out}/sweep.json, sweep.csv, fid_by_guidance.png", file=sys.stderr)
    return 0
