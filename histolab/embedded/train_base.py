"""Train the embedded default base model on the bundled images.

    python -m histolab.embedded.train_base --work .cache/base-train [--stage all|vae|latents|unet|export]

Three stages, each resumable (state is checkpointed atomically under
``--work``; rerunning the same command continues where it stopped):

1. ``vae``: an f4 AutoencoderKL on random 64 px crops of the training bands and
   of the bundled photos (L1 + L1 on image gradients + a tiny KL term, as SD's
   VAE uses a KL weight of 1e-6; no perceptual or adversarial loss, because no
   pretrained perceptual network can be had offline and training against the
   Inception network would bias the FID we report).
2. ``latents``: encode a fixed, seeded set of crops (random position and one of
   the 8 rotations/flips, which are label-preserving for tissue) once; the
   latent scaling factor is 1/std of these latents, as SD 1.5 derived 0.18215.
3. ``unet``: U-Net and CLIP text encoder trained together on epsilon
   prediction with SD 1.5's noise schedule, min-SNR-5 loss weighting (faster
   convergence, Hang et al. 2023), caption dropout 10% for classifier-free
   guidance, and an EMA of both networks; the EMA is what is exported.

``export`` writes a diffusers folder (fp16 safetensors) to
``checkpoints/embedded-base``. Only the validation band is used for the
occasional progress check; the test band is never touched here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import histolab  # noqa: F401  (torchvision shim before diffusers)
from histolab.config import EMBEDDED_BASE_DIR
from histolab.data import bundled
from histolab.data.prompts import CLASS_PROMPTS, sample_caption
from histolab.embedded.architecture import EMBEDDED, build_components
from histolab.pipeline import SHIPPED_SHARD_SIZE

P_PHOTO = 0.2  # share of non-tissue photos in each batch: a broad, general model
N_LATENTS_PER_CLASS = 5000
N_LATENTS_PHOTOS = 2500


# ----------------------------------------------------------------- data


class CropSampler:
    """Random 64 px crops from the training bands (tissue) and from photos."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.tissue = []
        for src in bundled.TISSUE_SOURCES:
            arr = bundled.source_array(src.file)
            r0, r1 = bundled.bands(arr.shape[0])["train"]
            self.tissue.append((src.label, arr[r0:r1]))
        self.photos = [(cap, np.asarray(im)) for cap, im in bundled.photos()]

    def _dihedral(self, a: np.ndarray) -> np.ndarray:
        k = int(self.rng.integers(4))
        a = np.rot90(a, k)
        if self.rng.integers(2):
            a = a[:, ::-1]
        return np.ascontiguousarray(a)

    def tissue_crop(self, cls_idx: int) -> tuple[np.ndarray, str]:
        label, arr = self.tissue[cls_idx]
        size = bundled.CROP
        for _ in range(50):
            y = int(self.rng.integers(arr.shape[0] - size + 1))
            x = int(self.rng.integers(arr.shape[1] - size + 1))
            patch = arr[y : y + size, x : x + size]
            if bundled.tissue_fraction(patch) >= bundled.TISSUE_MIN_FRACTION:
                return self._dihedral(patch), label
        return self._dihedral(patch), label

    def photo_crop(self) -> tuple[np.ndarray, str]:
        cap, arr = self.photos[int(self.rng.integers(len(self.photos)))]
        size = bundled.CROP
        y = int(self.rng.integers(arr.shape[0] - size + 1))
        x = int(self.rng.integers(arr.shape[1] - size + 1))
        patch = arr[y : y + size, x : x + size]
        if self.rng.integers(2):
            patch = patch[:, ::-1]
        return np.ascontiguousarray(patch), cap

    def mixed_batch(self, n: int) -> torch.Tensor:
        out = []
        for _ in range(n):
            if self.rng.random() < P_PHOTO:
                out.append(self.photo_crop()[0])
            else:
                out.append(self.tissue_crop(int(self.rng.integers(len(self.tissue))))[0])
        return to_tensor(np.stack(out))


def to_tensor(batch_uint8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(batch_uint8).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


# ----------------------------------------------------------- checkpoints


def atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_state(path: Path):
    # Our own files, but still loaded without unpickling arbitrary objects.
    return torch.load(path, map_location="cpu", weights_only=True)


def log(work: Path, msg: str) -> None:
    line = f"{time.strftime('%H:%M:%S')} {msg}"
    print(line, flush=True)
    with open(work / "train.log", "a") as fh:
        fh.write(line + "\n")


def save_grid(images: np.ndarray, path: Path, cols: int) -> None:
    n, h, w, _ = images.shape
    rows = math.ceil(n / cols)
    grid = np.full((rows * h, cols * w, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = im
    Image.fromarray(grid).save(path)


# ------------------------------------------------------------------- VAE


def vae_loss(vae, x: torch.Tensor, kl_weight: float = 1e-6):
    post = vae.encode(x).latent_dist
    z = post.sample()
    rec = vae.decode(z).sample
    l1 = (rec - x).abs().mean()
    # L1 on finite differences keeps edges (nuclear borders) from blurring.
    gx = ((rec[..., 1:] - rec[..., :-1]) - (x[..., 1:] - x[..., :-1])).abs().mean()
    gy = ((rec[..., 1:, :] - rec[..., :-1, :]) - (x[..., 1:, :] - x[..., :-1, :])).abs().mean()
    # LDM sums both terms over pixels with a KL weight of 1e-6; ours are means,
    # so the KL sum is divided by the number of pixels to keep that ratio.
    kl = post.kl().mean() / x[0].numel()
    return l1 + gx + gy + kl_weight * kl, l1


def train_vae(work: Path, steps: int, batch: int, lr: float, seed: int) -> None:
    vae, _, _ = build_components(EMBEDDED, seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    ck = work / "vae_state.pt"
    start = 0
    sampler = CropSampler(seed)
    if ck.exists():
        st = load_state(ck)
        vae.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        start = int(st["step"])
        sampler.rng = np.random.default_rng([seed, start])
        log(work, f"vae: resumed at step {start}")
    if start >= steps:
        return
    fixed = CropSampler(seed + 99).mixed_batch(16)
    vae.train()
    t0, acc = time.time(), 0.0
    for step in range(start, steps):
        # Cosine decay to 10% over the run; no warm-up needed for a small VAE with AdamW.
        for g in opt.param_groups:
            g["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        x = sampler.mixed_batch(batch)
        loss, l1 = vae_loss(vae, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        acc += l1.item()
        if (step + 1) % 100 == 0:
            log(work, f"vae step {step + 1}/{steps} l1 {acc / 100:.4f} {(time.time() - t0) / 100:.2f}s/step")
            acc, t0 = 0.0, time.time()
        if (step + 1) % 500 == 0 or step + 1 == steps:
            sampler.rng = np.random.default_rng([seed, step + 1])
            atomic_save({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step + 1}, ck)
            with torch.no_grad():
                vae.eval()
                rec = vae.decode(vae.encode(fixed).latent_dist.mode()).sample
                vae.train()
            save_grid(np.concatenate([to_uint8(fixed), to_uint8(rec)]), work / "vae_recon.png", 16)


def load_vae(work: Path):
    vae, _, _ = build_components(EMBEDDED, 0)
    vae.load_state_dict(load_state(work / "vae_state.pt")["model"])
    return vae.eval()


# --------------------------------------------------------------- latents


@torch.no_grad()
def cache_latents(work: Path, seed: int) -> None:
    out = work / "latents.pt"
    if out.exists():
        return
    vae = load_vae(work)
    sampler = CropSampler(seed + 1)
    imgs, labels, captions = [], [], []
    for ci, (label, _) in enumerate(sampler.tissue):
        for _ in range(N_LATENTS_PER_CLASS):
            imgs.append(sampler.tissue_crop(ci)[0])
            labels.append(label)
            captions.append("")
    for _ in range(N_LATENTS_PHOTOS):
        im, cap = sampler.photo_crop()
        imgs.append(im)
        labels.append("photo")
        captions.append(cap)
    lat = []
    for i in range(0, len(imgs), 128):
        lat.append(vae.encode(to_tensor(np.stack(imgs[i : i + 128]))).latent_dist.mode())
        log(work, f"latents {i + len(lat[-1])}/{len(imgs)}")
    latents = torch.cat(lat)
    scale = float(1.0 / latents.std())
    log(work, f"latents: {tuple(latents.shape)} std {latents.std():.4f} -> scaling_factor {scale:.5f}")
    atomic_save({"latents": latents.half(), "labels": labels, "captions": captions, "scaling_factor": scale}, out)


# ------------------------------------------------------------------ U-Net


class EMA:
    def __init__(self, modules: list[torch.nn.Module], decay: float):
        self.decay = decay
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        # Warm-up of the decay so early averages are not dominated by init.
        d = min(self.decay, (1 + step) / (10 + step))
        for s, p in zip(self.shadow, self.params, strict=True):
            s.lerp_(p.detach(), 1 - d)

    def state_dict(self):
        return {"shadow": self.shadow}

    def load_state_dict(self, st):
        for s, v in zip(self.shadow, st["shadow"], strict=True):
            s.copy_(v)

    @torch.no_grad()
    def copy_to(self, modules: list[torch.nn.Module]) -> None:
        params = [p for m in modules for p in m.parameters()]
        for s, p in zip(self.shadow, params, strict=True):
            p.copy_(s)


def tokenizer_dir(work: Path) -> Path:
    from histolab.embedded.tokenizer_build import build

    d = work / "tokenizer"
    if not (d / "vocab.json").exists():
        build(d)
    return d


def encode_text(tokenizer, text_encoder, captions: list[str]) -> torch.Tensor:
    ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids)[0]


@torch.no_grad()
def sample_images(
    unet,
    text_encoder,
    tokenizer,
    vae,
    scaling: float,
    prompts: list[str],
    seed: int,
    steps: int = 25,
    guidance: float = 4.0,
):
    """A small DDIM sampler for progress grids (the product engine lives in histolab.generation)."""
    from diffusers import DDIMScheduler

    sch = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    sch.set_timesteps(steps)
    cond = encode_text(tokenizer, text_encoder, prompts)
    unc = encode_text(tokenizer, text_encoder, [""] * len(prompts))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((len(prompts), 4, 16, 16), generator=g)
    for t in sch.timesteps:
        eps = unet(torch.cat([x, x]), t, torch.cat([unc, cond])).sample
        eu, ec = eps.chunk(2)
        x = sch.step(eu + guidance * (ec - eu), t, x).prev_sample
    return to_uint8(vae.decode(x / scaling).sample)


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    # Constant, then cosine to 10% over the last 40% of the run.
    tail = int(total * 0.6)
    if step < tail:
        return base
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - tail) / max(1, total - tail))))


def train_unet(work: Path, steps: int, batch: int, lr: float, seed: int, ema_decay: float) -> None:
    from transformers import CLIPTokenizer

    data = load_state(work / "latents.pt")
    latents = data["latents"].float() * data["scaling_factor"]
    labels, captions = data["labels"], data["captions"]
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir(work))
    _, unet, text_encoder = build_components(EMBEDDED, seed)
    sched = _train_scheduler()
    alphas = sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    params = [
        {"params": list(unet.parameters()), "lr": lr},
        {"params": list(text_encoder.parameters()), "lr": lr * 0.5},
    ]
    opt = torch.optim.AdamW(params, betas=(0.9, 0.999), weight_decay=1e-2)
    ema = EMA([unet, text_encoder], ema_decay)
    ck = work / "unet_state.pt"
    start = 0
    if ck.exists():
        st = load_state(ck)
        unet.load_state_dict(st["unet"])
        text_encoder.load_state_dict(st["text_encoder"])
        opt.load_state_dict(st["opt"])
        ema.load_state_dict(st["ema"])
        start = int(st["step"])
        log(work, f"unet: resumed at step {start}")
    if start >= steps:
        return
    rng = np.random.default_rng([seed, start])
    crng = random.Random(seed * 1000003 + start)
    n = len(latents)
    vae = load_vae(work)
    unet.train()
    text_encoder.train()
    t0, acc = time.time(), 0.0
    for step in range(start, steps):
        for g, base in zip(opt.param_groups, (lr, lr * 0.5), strict=True):
            g["lr"] = lr_at(step, steps, base, 500)
        idx = rng.integers(n, size=batch)
        x0 = latents[idx]
        caps = [
            sample_caption(
                None if labels[i] == "photo" else labels[i], crng, captions[i] if labels[i] == "photo" else None
            )
            for i in idx
        ]
        noise = torch.from_numpy(rng.standard_normal(x0.shape).astype(np.float32))
        t = torch.from_numpy(rng.integers(0, 1000, size=batch))
        xt = sched.add_noise(x0, noise, t)
        emb = encode_text(tokenizer, text_encoder, caps)
        pred = unet(xt, t, emb).sample
        w = torch.clamp(snr[t], max=5.0) / snr[t]  # min-SNR-5 for epsilon prediction
        loss = (w * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(unet.parameters()) + list(text_encoder.parameters()), 1.0)
        opt.step()
        ema.update(step)
        acc += loss.item()
        if (step + 1) % 100 == 0:
            dt = (time.time() - t0) / 100
            log(
                work,
                f"unet step {step + 1}/{steps} loss {acc / 100:.4f} lr {opt.param_groups[0]['lr']:.2e} {dt:.2f}s/step eta {dt * (steps - step - 1) / 3600:.1f}h",
            )
            acc, t0 = 0.0, time.time()
        if (step + 1) % 500 == 0 or step + 1 == steps:
            state = {
                "unet": unet.state_dict(),
                "text_encoder": text_encoder.state_dict(),
                "opt": opt.state_dict(),
                "ema": ema.state_dict(),
                "step": step + 1,
            }
            atomic_save(state, ck)
            if (step + 1) % 2000 == 0 or step + 1 == steps:
                atomic_save(state, work / f"unet_state_{step + 1}.pt")
            _progress_grid(work, unet, text_encoder, tokenizer, vae, ema, data["scaling_factor"], step + 1)


def _train_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _progress_grid(work, unet, text_encoder, tokenizer, vae, ema, scaling, step):
    import copy

    u, te = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    ema.copy_to([u, te])
    prompts = (
        [p for p in CLASS_PROMPTS.values() for _ in range(6)] + ["a histology image"] * 6 + ["a photo of a cat"] * 6
    )
    imgs = sample_images(u, te, tokenizer, vae, scaling, prompts, seed=0)
    save_grid(imgs, work / f"samples_{step:06d}.png", 6)


# ----------------------------------------------------------------- export


def model_from_state(work: Path, state_path: Path):
    """A BaseModel with the EMA weights of a U-Net training checkpoint (for validation)."""
    from transformers import CLIPTokenizer

    from histolab.base_model import assemble
    from histolab.embedded.architecture import SD15_SCHEDULER
    from histolab.files import sha256_file

    st = load_state(state_path)
    data = load_state(work / "latents.pt")
    vae = load_vae(work)
    vae.register_to_config(scaling_factor=round(data["scaling_factor"], 5))
    _, unet, te = build_components(EMBEDDED, 0)
    ema = EMA([unet, te], 0.0)
    ema.load_state_dict(st["ema"])
    ema.copy_to([unet, te])
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir(work))
    return assemble(
        str(state_path), sha256_file(state_path), vae, unet, te, tokenizer, dict(SD15_SCHEDULER), "cpu", torch.float32
    )


def export(work: Path, out: Path) -> None:
    """Write the EMA weights as a diffusers folder in fp16 safetensors."""
    from diffusers import PNDMScheduler
    from transformers import CLIPTokenizer

    from histolab.embedded.architecture import SD15_SCHEDULER

    st = load_state(work / "unet_state.pt")
    data = load_state(work / "latents.pt")
    vae = load_vae(work)
    vae.register_to_config(scaling_factor=round(data["scaling_factor"], 5))
    _, unet, te = build_components(EMBEDDED, 0)
    unet.load_state_dict(st["unet"])
    te.load_state_dict(st["text_encoder"])
    ema = EMA([unet, te], 0.0)
    ema.load_state_dict(st["ema"])
    ema.copy_to([unet, te])
    out.mkdir(parents=True, exist_ok=True)
    for name, m in (("vae", vae), ("unet", unet), ("text_encoder", te)):
        m.to(torch.float16).save_pretrained(out / name, safe_serialization=True, max_shard_size=SHIPPED_SHARD_SIZE)
    tok_dir = tokenizer_dir(work)
    CLIPTokenizer.from_pretrained(tok_dir).save_pretrained(out / "tokenizer")
    # Keep the slow-format files too: SD-webui and older tools read these.
    for f in ("vocab.json", "merges.txt"):
        (out / "tokenizer" / f).write_bytes((tok_dir / f).read_bytes())
    cfg = {k: v for k, v in SD15_SCHEDULER.items() if not k.startswith("_")}
    PNDMScheduler.from_config(cfg).save_pretrained(out / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": __import__("diffusers").__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    info = {
        "trained_steps": int(st["step"]),
        "resolution": EMBEDDED.resolution,
        "command": "python -m histolab.embedded.train_base",
    }
    (out / "histolab_base.json").write_text(json.dumps(info, indent=2))
    log(work, f"exported step {st['step']} to {out}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Train the embedded default base model.")
    ap.add_argument("--work", type=Path, default=Path(".cache/base-train"))
    ap.add_argument("--out", type=Path, default=EMBEDDED_BASE_DIR)
    ap.add_argument("--stage", choices=["all", "vae", "latents", "unet", "export"], default="all")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae-steps", type=int, default=4000)
    ap.add_argument("--vae-batch", type=int, default=16)
    ap.add_argument("--vae-lr", type=float, default=4e-4)
    ap.add_argument("--unet-steps", type=int, default=16000)
    ap.add_argument("--unet-batch", type=int, default=32)
    ap.add_argument("--unet-lr", type=float, default=3e-4)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("HISTOLAB_THREADS", "2")))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.stage in ("all", "vae"):
        train_vae(args.work, args.vae_steps, args.vae_batch, args.vae_lr, args.seed)
    if args.stage in ("all", "latents"):
        cache_latents(args.work, args.seed)
    if args.stage in ("all", "unet"):
        train_unet(args.work, args.unet_steps, args.unet_batch, args.unet_lr, args.seed, args.ema)
    if args.stage in ("all", "export"):
        export(args.work, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
