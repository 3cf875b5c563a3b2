"""Train the embedded default's shipped adapters, one of each kind, and measure what each does.

    nice -n 5 python scripts/train_embedded_adapters.py                  # all five kinds, then FID
    python scripts/train_embedded_adapters.py --kinds lora,ti --fid-per-class 50

1. Each kind is trained with its ``tiny-*`` preset on the bundled data's train
   split over the embedded base (``--base``), under ``--work`` (rerunning the
   command resumes unfinished runs and reuses finished ones).
2. The finished adapter (the run folder's top-level files: the epoch chosen by
   validation FID, its manifest and samples; not the per-epoch folders or the
   resume state) is copied to ``<out-root>/embedded-<kind>/``.
3. FID (Inception, histolab.evaluation) against the bundled data's *test*
   crops, which no training or validation step saw: the same number of images
   per class, from the same seeds, with and without each adapter. Text kinds
   use their class prompts (``skin_he_tissue``, or the learned ``<skin_he>``
   token); the projector generates from held-out validation patches of each
   class (reference mode). "Without" is the base alone with the same
   class-label prompts, and, as the base's strongest baseline, with the
   captions it was trained on.

The numbers go into each shipped adapter's manifest (``metrics.fid_test``) and
to ``<work>/fid.json`` and ``<work>/fid.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import histolab  # noqa: E402,F401  (torchvision shim first)

KINDS = {
    "lora": "tiny-lora",
    "dreambooth": "tiny-dreambooth",
    "ti": "tiny-ti",
    "hypernetwork": "tiny-hypernetwork",
    "projector": "tiny-projector",
}
SHIPPED_NAME = {
    "lora": "embedded-lora",
    "dreambooth": "embedded-dreambooth",
    "ti": "embedded-textual-inversion",
    "hypernetwork": "embedded-hypernetwork",
    "projector": "embedded-projector",
}
SEED = 20_260_000  # generation seeds: image i of class c uses SEED + 10_000 * c + i, for every configuration


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


# ----------------------------------------------------------------- training


def train_kind(kind: str, args) -> Path:
    import dataclasses

    from histolab.training.config import with_overrides
    from histolab.training.loop import train
    from histolab.training.presets import get_preset

    preset = KINDS[kind]
    cfg = get_preset(preset).config()
    known = {f.name for f in dataclasses.fields(cfg)}
    # --set applies to the presets that have the setting (num_class_images is DreamBooth's only).
    cfg = with_overrides(cfg, {k: v for k, v in args.set if k in known}).check()
    run_dir = args.work / SHIPPED_NAME[kind]
    log(f"{kind}: training with {preset} into {run_dir}")
    result = train(
        cfg,
        base=args.base,
        data="bundled",
        out=run_dir,
        resume=True,
        preset=preset,
        device=args.device,
        log=lambda m: log(f"  {m}"),
    )
    log(f"{kind}: {result.message}")
    return run_dir


def ship(run_dir: Path, target: Path) -> Path:
    """Copy the adapter (top-level files of the run folder) to ``target``, replacing it whole."""
    from histolab.training.checkpoint import EPOCHS_DIR, WORK_DIR

    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for p in run_dir.iterdir():
        if p.name in (EPOCHS_DIR, WORK_DIR) or p.name.startswith("."):
            continue
        (shutil.copytree if p.is_dir() else shutil.copy2)(p, tmp / p.name)
    if (tmp / "unet").is_dir():  # DreamBooth: a full U-Net, sharded to stay small in git
        from diffusers import UNet2DConditionModel

        from histolab.pipeline import reshard_for_shipping

        reshard_for_shipping(tmp / "unet", UNet2DConditionModel)
    if target.exists():
        shutil.rmtree(target)
    os.rename(tmp, target)
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    log(f"shipped {target} ({size / 1e6:.1f} MB)")
    return target


# ---------------------------------------------------------------------- FID


def real_test_set(per_class: int | None):
    from histolab.data import bundled
    from histolab.training.validation import subset

    crops = bundled.crops("test")
    images = [bundled.load_crop(c) for c in crops]
    labels = [c.label for c in crops]
    if per_class is not None:
        chosen_i, chosen_l = [], []
        for lab in bundled.labels():
            idx = [i for i, x in enumerate(labels) if x == lab][:per_class]
            chosen_i += [images[i] for i in idx]
            chosen_l += [lab] * len(idx)
        images, labels = chosen_i, chosen_l
    return subset(images, labels, len(images), 0)


def generate_set(
    model,
    classes,
    per_class: int,
    args,
    *,
    prompt_for=None,
    adapter: Path | None = None,
    references=None,
    guidance: float,
):
    """``per_class`` images of each class: from prompts (``prompt_for(label)``) or from reference patches."""
    from histolab.generation import AdapterSpec, GenerationRequest, generate

    specs = (AdapterSpec(str(adapter)),) if adapter is not None else ()
    images, labels = [], []
    for ci, label in enumerate(classes):
        seeds = [SEED + 10_000 * ci + i for i in range(per_class)]
        if references is None:
            for s in range(0, per_class, 16):
                req = GenerationRequest(
                    prompt=prompt_for(label),
                    steps=args.fid_steps,
                    scheduler=args.scheduler,
                    guidance_scale=guidance,
                    adapters=specs,
                )
                images += [g.image for g in generate(model, req, seeds=seeds[s : s + 16])]
        else:
            for seed, ref in zip(seeds, references[label], strict=True):
                req = GenerationRequest(
                    mode="reference",
                    reference=ref,
                    steps=args.fid_steps,
                    scheduler=args.scheduler,
                    guidance_scale=guidance,
                    seed=seed,
                    adapters=specs,
                )
                images += [g.image for g in generate(model, req)]
        labels += [label] * per_class
    return images, labels


def fid_of(real_feats, images, labels, extractor) -> dict:
    """FID overall and per class, and KID, from histolab.evaluation's features and metrics.

    (Only these: evaluate.compare would also compute Vendi scores, eigendecompositions of 2048 x 2048
    matrices per class, which cost more than the FIDs themselves here.)
    """
    from histolab.evaluation import metrics
    from histolab.evaluation.features import ALL, collect
    from histolab.evaluation.images import images_from_pil

    fake = collect([extractor], images_from_pil(images, labels, spec="generated"))[extractor.name]

    def fid(key):
        r, f = real_feats.stats[key], fake.stats[key]
        return float(metrics.frechet_distance(r.mean, r.cov, f.mean, f.cov))

    kid = metrics.kid(real_feats.rows(), fake.rows(), subsets=100, subset_size=1000, seed=0)
    return {
        "fid": fid(ALL),
        "kid_x1000": kid["kid_mean"] * 1000,
        "n_fake": len(images),
        "per_class_fid": {c: fid(c) for c in sorted(set(labels)) if c in real_feats.stats},
    }


def measure(args, shipped: dict[str, Path]) -> dict:
    from histolab.data import bundled
    from histolab.data.prompts import CLASS_PROMPTS
    from histolab.evaluation.extractors import InceptionExtractor
    from histolab.evaluation.features import collect_cached
    from histolab.evaluation.images import images_from_pil
    from histolab.pipeline import load_base
    from histolab.training.data import label_slug
    from histolab.training.presets import get_preset

    model = load_base(args.base, device=args.device or "cpu")
    classes = bundled.labels()
    real_images, real_labels = real_test_set(args.real_per_class)
    extractor = InceptionExtractor(device=args.device or "cpu")
    log(f"FID reference: {len(real_images)} held-out test crops")
    real = collect_cached(
        [extractor], images_from_pil(real_images, real_labels, spec="bundled:test"), args.work / "features"
    )[extractor.name]
    n = args.fid_per_class
    text_guidance = args.text_guidance
    results: dict = {
        "real": {
            "split": "bundled test",
            "n": len(real_images),
            "per_class": {c: real_labels.count(c) for c in classes},
        },
        "generation": {
            "per_class": n,
            "steps": args.fid_steps,
            "scheduler": args.scheduler,
            "seed": SEED,
            "base": str(args.base),
            "base_hash": model.hash,
        },
        "base": {},
        "adapters": {},
    }

    def guidance_of(kind):
        return text_guidance if text_guidance is not None else get_preset(KINDS[kind]).config().sample_guidance

    g_text = guidance_of("lora")
    class_label = {c: f"{label_slug(c)}_tissue" for c in classes}
    for name, prompts in (("class-label prompts", class_label), ("base captions", CLASS_PROMPTS)):
        log(f"base alone, {name}: generating {n} per class")
        imgs, labs = generate_set(model, classes, n, args, prompt_for=prompts.__getitem__, guidance=g_text)
        results["base"][name] = {**fid_of(real, imgs, labs, extractor), "prompts": prompts, "guidance": g_text}
        log(f"  FID {results['base'][name]['fid']:.2f}")
    base_fid = results["base"]["class-label prompts"]["fid"]
    for kind, folder in shipped.items():
        from histolab.adapters.manifest import read_manifest

        m = read_manifest(folder)
        g = guidance_of(kind)
        if kind == "projector":
            val = bundled.crops("val")
            refs = {}
            import numpy as np

            for ci, c in enumerate(classes):
                pool = [x for x in val if x.label == c]
                pick = np.random.default_rng([SEED, ci]).choice(len(pool), size=n, replace=len(pool) < n)
                refs[c] = [bundled.load_crop(pool[j]) for j in pick]
            condition = "reference patches from the validation split"
            imgs, labs = generate_set(model, classes, n, args, adapter=folder, references=refs, guidance=g)
        else:
            tokens = m.config.get("tokens", {})
            prompts = {c: tokens[c] for c in classes} if tokens else class_label
            condition = f"prompts {prompts}"
            imgs, labs = generate_set(
                model, classes, n, args, prompt_for=prompts.__getitem__, adapter=folder, guidance=g
            )
        res = fid_of(real, imgs, labs, extractor)
        res.update(
            condition=condition,
            guidance=g,
            base_fid_class_label_prompts=base_fid,
            base_fid_captions=results["base"]["base captions"]["fid"],
            lower_than_base=res["fid"] < base_fid,
        )
        results["adapters"][kind] = res
        log(f"{kind}: FID {res['fid']:.2f} with the adapter vs {base_fid:.2f} for the base alone")
        m.metrics["fid_test"] = {k: v for k, v in res.items()} | {
            "real": results["real"],
            "generation": results["generation"],
        }
        from histolab.training.loop import _write_manifest

        _write_manifest(folder, m)
    return results


def markdown(results: dict) -> str:
    g = results["generation"]
    lines = [
        f"FID (Inception) against {results['real']['n']} held-out test crops of the bundled data; "
        f"{g['per_class']} generated images per class, {g['steps']} {g['scheduler']} steps, the same seeds throughout.",
        "",
        "| adapter | conditioning | FID with adapter | FID base alone (same class-label prompts) | "
        "FID base alone (its own captions) |",
        "|---|---|---|---|---|",
    ]
    for kind, r in results["adapters"].items():
        cond = "reference patch" if kind == "projector" else "class prompt"
        lines.append(
            f"| {kind} | {cond} | {r['fid']:.2f} | {r['base_fid_class_label_prompts']:.2f} | "
            f"{r['base_fid_captions']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="embedded", help="base model (default: the embedded default)")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated subset of {', '.join(KINDS)}")
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "embedded-adapters", help="training runs and caches")
    ap.add_argument("--out-root", type=Path, default=ROOT / "checkpoints", help="where embedded-<kind>/ are written")
    ap.add_argument("--fid-per-class", type=int, default=100, help="generated images per class for FID")
    ap.add_argument("--real-per-class", type=int, default=None, help="cap on test crops per class (default: all)")
    ap.add_argument("--fid-steps", type=int, default=25, help="sampler steps for the FID images")
    ap.add_argument("--scheduler", default="dpmpp_2m_karras", help="sampler for the FID images")
    ap.add_argument("--text-guidance", type=float, default=None, help="guidance for prompts (default: the preset's)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        type=lambda s: tuple(s.split("=", 1)),
        metavar="K=V",
        help="override a setting of every preset (for quick checks), e.g. --set max_steps=3",
    )
    ap.add_argument("--skip-train", action="store_true", help="measure the adapters already in --out-root")
    ap.add_argument("--no-fid", action="store_true", help="train and ship only")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: a GPU when there is one)")
    ap.add_argument(
        "--threads", type=int, default=int(os.environ.get("HISTOLAB_THREADS", "2")), help="CPU threads for torch"
    )
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from histolab.training.config import CONFIG_CLASSES

    all_fields = {f for cls in CONFIG_CLASSES.values() for f in cls.__dataclass_fields__}
    bad = [k for k, _ in args.set if k not in all_fields]
    if bad:
        ap.error(f"--set {bad[0]}: no preset has this setting")
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        ap.error(f"unknown kinds {unknown}; choose from {', '.join(KINDS)}")
    args.work.mkdir(parents=True, exist_ok=True)
    shipped = {}
    for kind in kinds:
        target = args.out_root / SHIPPED_NAME[kind]
        if not args.skip_train:
            ship(train_kind(kind, args), target)
        shipped[kind] = target
    if args.no_fid:
        return 0
    results = measure(args, shipped)
    (args.work / "fid.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    table = markdown(results)
    (args.work / "fid.md").write_text(table + "\n")
    print(table)
    return 0 if all(r["lower_than_base"] for r in results["adapters"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
