"""Training speed and memory, each against its reference in the same run.

1. CPU (default): histolab's LoRA trainer against diffusers' reference LoRA
   training loop, on the same model, data and settings. The reference is the
   algorithm of diffusers' examples/text_to_image/train_text_to_image_lora.py,
   reimplemented here: peft LoRA (rank r, alpha r, Gaussian init) on
   to_q/to_k/to_v/to_out.0 of the U-Net; a DataLoader whose transforms resize,
   centre-crop, flip and normalise every image every epoch; every step encodes
   the pixels with the VAE and the prompts with the text encoder, adds noise
   at random timesteps, and takes an AdamW step on the MSE of the predicted
   noise with gradient clipping at 1.0, under accelerate. histolab's trainer
   does the same optimisation, but encodes the (frozen) VAE latents and text
   embeddings once before the first step. The model is the embedded
   architecture with seeded random weights (random weights time the same as
   trained ones); both sides get the same bundled images, prompts, batch,
   rank, learning rate and number of steps. Each side runs in its own child
   process, so its peak resident memory is its own.
2. GPU (``--gpu``): the foundation-embedding trainer at SD 1.5 scale
   (SD-1.5-shaped U-Net with random weights, a UNI2-h-shaped encoder: timm
   ViT-H/14 with the published arguments, random weights), 512 x 512, batch
   16, bf16, the 2026 baseline preset: peak GPU memory during training steps
   (the paper reports about 12 GB) and samples/s. ``--gpu-smoke`` runs the
   same code path at tiny scale on the CPU to check that it runs (its numbers
   mean nothing).

    python bench/training.py [--steps 20] [--warmup 3] [--batch 16] [--rank 8] [--threads 2]
    python bench/training.py --gpu            # on a CUDA machine
    python bench/training.py --gpu-smoke      # the GPU path at tiny scale, on the CPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import histolab  # noqa: E402,F401  (torchvision shim before diffusers/timm)

PER_CLASS = 16  # bundled train crops per class: 48 images


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def bench_data(per_class: int):
    from histolab.data import bundled
    from histolab.training.data import _pick

    train = bundled.crops("train")
    by_class: dict[str, list[int]] = {}
    for i, c in enumerate(train):
        by_class.setdefault(c.label, []).append(i)
    chosen = [train[i] for i in _pick(by_class, per_class, 0)]
    return [bundled.load_crop(c) for c in chosen], [c.label for c in chosen]


def steady(times: list[tuple[int, float]], warmup: int) -> float:
    """Seconds per step after the warm-up steps, from (step, time) marks."""
    marks = dict(times)
    last = max(marks)
    return (marks[last] - marks[warmup]) / (last - warmup)


# ------------------------------------------------------------------ children


def child_ours(args) -> dict:
    import torch

    from histolab.embedded.random_init import random_base
    from histolab.training.config import LoraTrainConfig
    from histolab.training.loop import train

    torch.set_num_threads(args.threads)
    model = random_base(args.arch, seed=0)
    total = args.warmup + args.steps
    cfg = LoraTrainConfig(
        rank=args.rank,
        alpha=float(args.rank),
        target="attention",
        train_text_encoder=False,
        batch_size=args.batch,
        lr=1e-4,
        max_steps=total,
        repeats=100,  # one long epoch: no checkpoint inside the timed steps
        augment="flip",
        max_images_per_class=PER_CLASS,
        min_images_per_class=1,
        samples_per_class=0,
        validation="none",
        lr_schedule="constant",
        mixed_precision=args.precision,  # "no": fp32; "auto": bf16 autocast where the CPU has it (tiny-* presets)
    ).check()
    marks: list[tuple[int, float]] = []
    losses: list[float] = []
    t0 = time.perf_counter()

    def progress(p):
        if p.phase == "training":
            marks.append((p.step, time.perf_counter()))
            losses.append(p.loss)

    with tempfile.TemporaryDirectory() as tmp:
        train(cfg, base=model, data="bundled", out=Path(tmp) / "run", progress=progress, log=None, device="cpu")
    step_s = steady(marks, args.warmup)
    first = dict(marks)[1]
    return {
        "losses": losses,
        "step_s": step_s,
        "samples_per_s": args.batch / step_s,
        "setup_s": first - t0 - step_s,  # model on device, data, cached latents and text embeddings
        "peak_rss_mb": peak_rss_mb(),
    }


def child_reference(args) -> dict:
    """diffusers' train_text_to_image_lora.py core loop (reimplemented), on the same model and data."""
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig
    from torchvision import transforms

    from histolab.embedded.random_init import random_base
    from histolab.training.data import label_slug

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = random_base(args.arch, seed=0)
    accelerator = Accelerator(mixed_precision="no", gradient_accumulation_steps=1, cpu=True)
    unet, vae, text_encoder, tokenizer = model.unet, model.vae, model.text_encoder, model.tokenizer
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=args.rank,
            lora_alpha=args.rank,
            init_lora_weights="gaussian",
            target_modules=["to_k", "to_q", "to_v", "to_out.0"],
        )
    )
    lora_params = [p for p in unet.parameters() if p.requires_grad]
    for p in lora_params:
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(lora_params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    res = model.default_size
    tf = transforms.Compose([
        transforms.Resize(res, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(res),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize([0.5], [0.5]),
    ])  # fmt: skip
    images, labels = bench_data(PER_CLASS)
    ids = tokenizer(
        [f"{label_slug(lab)}_tissue" for lab in labels],
        max_length=tokenizer.model_max_length,
        padding="max_length",
        truncation=True,
        return_tensors="pt",
    ).input_ids

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return {"pixel_values": tf(images[i].convert("RGB")), "input_ids": ids[i]}

    loader = torch.utils.data.DataLoader(Data(), shuffle=True, batch_size=args.batch, num_workers=0)
    total = args.warmup + args.steps
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0, num_training_steps=total)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    noise_scheduler = DDPMScheduler.from_config({k: v for k, v in model.scheduler_config.items() if k[0] != "_"})
    marks: list[tuple[int, float]] = []
    step = 0
    while step < total:
        unet.train()
        for batch in loader:
            with accelerator.accumulate(unet):
                latents = vae.encode(batch["pixel_values"]).latent_dist.sample() * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],)).long()
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
                pred = unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
                loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(lora_params, 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            step += 1
            marks.append((step, time.perf_counter()))
            if step >= total:
                break
    step_s = steady(marks, args.warmup)
    return {
        "step_s": step_s,
        "samples_per_s": args.batch / step_s,
        "setup_s": dict(marks)[1] - t0 - step_s,
        "peak_rss_mb": peak_rss_mb(),
    }


def child_gpu(args) -> dict:
    """The foundation-embedding trainer at SD 1.5 scale (or the same path at tiny scale with --gpu-smoke)."""
    import torch

    from histolab.embedded.random_init import random_base
    from histolab.encoders.uni import UNI2_H, TimmEncoder
    from histolab.training.config import with_overrides
    from histolab.training.loop import train
    from histolab.training.presets import get_preset

    smoke = args.child == "gpu-smoke"
    device = "cpu" if smoke else "cuda"
    torch.set_num_threads(args.threads)
    model = random_base("tiny" if smoke else "sd15", seed=0)
    # UNI2-h's architecture with random weights (or a one-block ViT of the same family for the smoke run).
    vit = UNI2_H.build(depth=1, embed_dim=96, num_heads=4) if smoke else UNI2_H.build()
    encoder = TimmEncoder(UNI2_H, vit.to(device).eval(), "random-uni2-h-architecture", device)
    batch = 4 if smoke else 16
    total = args.warmup + args.steps
    cfg = with_overrides(
        get_preset("uni2h-2026-baseline").config(),
        {
            "resolution": 32 if smoke else 512,
            "batch_size": batch,
            "max_steps": total,
            "repeats": 100,
            "max_images_per_class": PER_CLASS,
            "min_images_per_class": 1,
            "samples_per_class": 0,
            "validation": "none",
            "augment": "none",
        },
    )
    marks: list[tuple[int, float]] = []
    peak = {}
    t0 = time.perf_counter()

    def progress(p):
        if p.phase != "training":
            return
        if device == "cuda":
            torch.cuda.synchronize()
            if p.step == args.warmup:
                peak["setup_and_warmup_gb"] = torch.cuda.max_memory_allocated() / 2**30
                torch.cuda.reset_peak_memory_stats()
        marks.append((p.step, time.perf_counter()))

    with tempfile.TemporaryDirectory() as tmp:
        train(
            cfg,
            base=model,
            data="bundled",
            out=Path(tmp) / "run",
            encoder=encoder,
            progress=progress,
            log=None,
            device=device,
        )
    step_s = steady(marks, args.warmup)
    out = {
        "step_s": step_s,
        "samples_per_s": batch / step_s,
        "setup_s": dict(marks)[1] - t0 - step_s,
        "batch": batch,
        "device": device,
    }
    if device == "cuda":
        out["peak_training_gb"] = torch.cuda.max_memory_allocated() / 2**30
        out["peak_setup_gb"] = peak.get("setup_and_warmup_gb")
        out["gpu"] = torch.cuda.get_device_name()
    else:
        out["peak_rss_mb"] = peak_rss_mb()
    return out


def loss_lines(a: list[float], b: list[float]) -> list[str]:
    """The two precisions' loss curves (same seeds, so the same images, noise and timesteps each step)."""
    import numpy as np

    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n = min(len(x), len(y))
    x, y = x[:n], y[:n]
    corr = float(np.corrcoef(x, y)[0, 1]) if n > 2 else float("nan")
    out = [
        f"loss curves, fp32 vs mixed_precision auto, {n} steps (the loop's running mean per step, same seeds): "
        f"max |diff| {np.abs(x - y).max():.5f} ({np.abs(x - y).max() / np.abs(x).mean():.2%} of the mean loss), "
        f"correlation {corr:.4f}"
    ]
    for i in sorted({0, n // 4, n // 2, 3 * n // 4, n - 1}):
        out.append(f"  step {i + 1:>3}: fp32 {x[i]:.5f}   auto {y[i]:.5f}")
    return out


CHILDREN = {"ours": child_ours, "reference": child_reference, "gpu": child_gpu, "gpu-smoke": child_gpu}


def run_child(name: str, args, precision: str = "no") -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        name,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--batch",
        str(args.batch),
        "--rank",
        str(args.rank),
        "--threads",
        str(args.threads),
        "--arch",
        args.arch,
        "--precision",
        precision,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="training speed and memory against references")
    ap.add_argument("--steps", type=int, default=20, help="timed optimiser steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--batch", type=int, default=16, help="images per step (CPU comparison)")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank (CPU comparison)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads in each child")
    ap.add_argument("--arch", default="embedded", help="architecture for the CPU comparison")
    ap.add_argument("--precision", default="no", help=argparse.SUPPRESS)  # the child's mixed_precision
    ap.add_argument(
        "--no-bf16", dest="bf16", action="store_false", help="skip histolab's trainer with mixed_precision auto"
    )
    ap.add_argument("--gpu", action="store_true", help="also the foundation-embedding trainer at SD 1.5 scale (CUDA)")
    ap.add_argument("--gpu-smoke", action="store_true", help="only the GPU path at tiny scale on the CPU")
    ap.add_argument("--child", default=None, choices=list(CHILDREN), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(CHILDREN[args.child](args)), flush=True)
        return 0
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    if args.gpu_smoke:
        r = run_child("gpu-smoke", args)
        print(f"GPU path at tiny scale on the CPU (checks the code runs; not a measurement): {json.dumps(r)}")
        return 0
    from histolab.precision import detect_cpu_bf16

    print(f"mixed_precision auto on this CPU: {detect_cpu_bf16().describe().replace('networks', 'autocast')}")
    ours = run_child("ours", args)
    ref = run_child("reference", args)
    fast = run_child("ours", args, "auto") if args.bf16 else None
    print(
        f"\nLoRA training, {args.arch} architecture (random weights), batch {args.batch}, rank {args.rank} on "
        f"to_q/k/v/out, CPU ({args.threads} threads); {args.steps} timed steps after {args.warmup} warm-up"
    )
    print(f"{'':44}{'samples/s':>10}{'s/step':>9}{'setup s':>9}{'peak RSS MB':>13}{'vs reference':>14}")
    rows = [("histolab LoRA trainer, fp32", ours), ("diffusers reference loop, fp32", ref)]
    if fast is not None:
        rows.append(("histolab LoRA trainer, mixed_precision auto", fast))
    for name, r in rows:
        print(
            f"{name:44}{r['samples_per_s']:>10.2f}{r['step_s']:>9.3f}{r['setup_s']:>9.1f}{r['peak_rss_mb']:>13.0f}"
            f"{r['samples_per_s'] / ref['samples_per_s']:>14.2f}"
        )
    print(
        f"ratio histolab fp32 / reference: samples/s {ours['samples_per_s'] / ref['samples_per_s']:.2f}, "
        f"peak RSS {ours['peak_rss_mb'] / ref['peak_rss_mb']:.2f}"
    )
    if fast is not None:
        print(
            f"ratio histolab mixed_precision auto / reference: samples/s "
            f"{fast['samples_per_s'] / ref['samples_per_s']:.2f}"
        )
        for line in loss_lines(ours["losses"], fast["losses"]):
            print(line)
    if args.gpu:
        g = run_child("gpu", args)
        print(
            f"\nfoundation-embedding trainer, SD 1.5 shapes + UNI2-h-shaped encoder, 512 px, batch 16, bf16 on "
            f"{g.get('gpu')}: {g['samples_per_s']:.2f} samples/s, {g['step_s']:.3f} s/step, peak GPU memory "
            f"{g['peak_training_gb']:.2f} GiB during training steps ({g['peak_setup_gb']:.2f} GiB up to the end of "
            "warm-up, encoder caching included); the paper reports about 12 GB"
        )
    print(f"\nload average at end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
