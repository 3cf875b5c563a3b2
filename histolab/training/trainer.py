"""What every method's trainer shares: cached latents and text embeddings, the
noise-prediction loss, batches drawn from per-step generators, and the
contract the loop (histolab.training.loop) drives.

A trainer builds a ``TrainNet``: one ``nn.Module`` whose ``forward(batch)``
returns the loss and which holds every trainable parameter as a registered
submodule, so that ``accelerator.prepare`` wraps it once (DDP synchronises
exactly those parameters, autocast covers the whole step). Frozen parts stay
in eval mode with ``requires_grad=False`` whatever ``train()`` is called with.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from histolab.training.config import TrainConfig
from histolab.training.data import TrainingData, label_slug

TRAINERS = {
    "lora": "histolab.training.lora:LoraTrainer",
    "dreambooth": "histolab.training.dreambooth:DreamBoothTrainer",
    "textual_inversion": "histolab.training.textual_inversion:TextualInversionTrainer",
    "hypernetwork": "histolab.training.hypernetwork:HypernetworkTrainer",
    "projector": "histolab.training.projector:ProjectorTrainer",
}


def trainer_class(method: str):
    import importlib

    mod, _, cls = TRAINERS[method].partition(":")
    return getattr(importlib.import_module(mod), cls)


class TrainNet(torch.nn.Module):
    """Base of each method's network: ``frozen`` names submodules that never leave eval mode."""

    frozen: tuple[str, ...] = ()

    def train(self, mode: bool = True):
        super().train(mode)
        for name in self.frozen:
            m = getattr(self, name, None)
            if m is not None:
                m.eval()
        return self


def eps_loss(unet, scheduler, latents, noise, timesteps, cond) -> torch.Tensor:
    """Per-sample MSE of the U-Net's prediction against the target of the base's noise schedule."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    pred = unet(noisy, timesteps, encoder_hidden_states=cond).sample
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:  # pragma: no cover - SD-1.5-family bases are epsilon or v
        raise ValueError(f"prediction type {kind!r} is not trained here")
    return torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))


def transforms_for(augment: str) -> list[int]:
    """Indices into the dihedral group: 0 identity, 1-3 rotations, 4 flip, 5-7 flip + rotation."""
    return {"none": [0], "flip": [0, 4], "dihedral": list(range(8))}[augment]


def dihedral(arr: np.ndarray, k: int) -> np.ndarray:
    if k >= 4:
        arr = arr[:, ::-1]
    return np.ascontiguousarray(np.rot90(arr, k % 4))


def fit(im: Image.Image, size: int) -> Image.Image:
    from histolab.data.images import fit as fit_image

    return fit_image(im.convert("RGB"), size)


class Trainer:
    """One method. The loop calls: ``prepare`` (caches, trainables), ``network``, ``param_groups``,
    ``items``/``batch`` every step, ``trainable_state``/``load_trainable_state`` for resume,
    ``save_adapter`` per checkpoint, and ``sample_requests`` for samples and validation."""

    kind = ""
    uses_text = True  # conditions on prompts (all but the projector)

    def __init__(
        self,
        cfg: TrainConfig,
        model,
        data: TrainingData,
        *,
        device,
        weight_dtype,
        workdir: Path,
        log,
        sampler=None,
        encoder=None,
        progress=None,
    ):
        self.cfg = cfg
        self.model = model
        self.data = data
        self.device = device
        self.weight_dtype = weight_dtype
        self.workdir = workdir
        self.log = log
        self.sampler = sampler  # EpochSampler: the frozen base for class images and reference checks
        self.encoder = encoder
        self.progress = progress or (lambda phase, message="": None)
        self.resolution = cfg.resolution or model.default_size
        self.transforms = transforms_for(cfg.augment)
        from diffusers import DDPMScheduler

        config = {k: v for k, v in model.scheduler_config.items() if not k.startswith("_")}
        self.noise_scheduler = DDPMScheduler.from_config(config)
        self.noise_scheduler.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(device)
        self.latent_mean: torch.Tensor | None = None  # (N, T, C, h, w) float32 on CPU
        self.latent_std: torch.Tensor | None = None
        self.text_cache: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------- contract
    def prepare(self) -> None:
        raise NotImplementedError

    def network(self) -> TrainNet:
        raise NotImplementedError

    def param_groups(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def trainable_named(self) -> dict[str, torch.nn.Parameter]:
        raise NotImplementedError

    def save_adapter(self, folder: Path, manifest) -> None:
        raise NotImplementedError

    def items(self) -> int:
        return len(self.data.images)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().float().cpu() for k, p in self.trainable_named().items()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        own = self.trainable_named()
        missing = sorted(set(own) - set(state))
        extra = sorted(set(state) - set(own))
        if missing or extra:
            from histolab.errors import TrainingError

            raise TrainingError(
                f"the saved state does not fit this run's trainable parameters (missing {missing[:3]}, "
                f"unexpected {extra[:3]}); was it saved by another method or config?"
            )
        with torch.no_grad():
            for k, p in own.items():
                p.copy_(state[k].to(p.device, p.dtype))

    def class_prompt(self, label: str) -> str:
        return self.cfg.prompt_template.format(label=label_slug(label))

    def sample_requests(self, per_class: int, seed: int, labels_out: list[str]):
        """GenerationRequests (one batch per class) for samples and validation; fills ``labels_out``."""
        from histolab.generation import GenerationRequest

        out = []
        for ci, label in enumerate(self.data.classes):
            out.append(
                GenerationRequest(
                    prompt=self.class_prompt(label),
                    steps=self.cfg.sample_steps,
                    guidance_scale=self.cfg.sample_guidance,
                    scheduler=self.cfg.sample_scheduler,
                    batch_size=per_class,
                    seed=seed + 1000 * ci,
                    width=self.resolution,
                    height=self.resolution,
                )
            )
            labels_out.extend([label] * per_class)
        return out

    def close(self) -> None:
        """Undo changes to the base model's modules (the loop's model is discarded after; this is for in-process reuse)."""

    # ------------------------------------------------------------- caching
    def cache_key(self, *parts) -> str:
        h = hashlib.sha256()
        for p in parts:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
            h.update(b"\0")
        return h.hexdigest()[:16]

    def pixel_batches(self, images: list[Image.Image], batch: int = 32):
        """(index, (n, 3, H, W) in [-1, 1]) for every image under every augmentation transform."""
        arrays = [np.asarray(fit(im, self.resolution), dtype=np.uint8) for im in images]
        flat = [(i, t) for i in range(len(arrays)) for t in range(len(self.transforms))]
        for s in range(0, len(flat), batch):
            chunk = flat[s : s + batch]
            x = np.stack([dihedral(arrays[i], self.transforms[t]) for i, t in chunk])
            yield chunk, torch.from_numpy(x).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)

    @torch.no_grad()
    def encode_latents(self, images: list[Image.Image], name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """VAE posterior mean and std of every image under every transform, (N, T, C, h, w) float32 on the CPU.

        The VAE is frozen, so this is done once and kept in the run's folder (keyed by the base, the
        images, the size and the transforms), so a resumed run reads it back bit for bit.
        """
        from safetensors.torch import load_file, save_file

        key = self.cache_key(self.model.hash, name, images_digest(images), self.resolution, self.transforms)
        path = self.workdir / f"latents-{name}-{key}.safetensors"
        if path.is_file():
            d = load_file(str(path))
            return d["mean"], d["std"]
        vae = self.model.vae
        mean = std = None
        n_t = len(self.transforms)
        done = 0
        for chunk, x in self.pixel_batches(images):
            dist = vae.encode(x.to(self.device, vae.dtype)).latent_dist
            m, s = dist.mean.float().cpu(), dist.std.float().cpu()
            if mean is None:
                mean = torch.empty((len(images), n_t, *m.shape[1:]))
                std = torch.empty_like(mean)
            for j, (i, t) in enumerate(chunk):
                mean[i, t], std[i, t] = m[j], s[j]
            done += len(chunk)
            self.progress("caching", f"VAE latents {done}/{len(images) * n_t}")
        from histolab.training.state import atomic_write

        atomic_write(path, lambda tmp: save_file({"mean": mean.contiguous(), "std": std.contiguous()}, str(tmp)))
        return mean, std

    def cache_training_latents(self) -> None:
        self.latent_mean, self.latent_std = self.encode_latents(self.data.images, "train")

    def draw_latents(self, idx: np.ndarray, gen: torch.Generator, mean=None, std=None) -> torch.Tensor:
        """Scaled latents for items ``idx``: a random transform each, sampled from the cached posterior."""
        mean = self.latent_mean if mean is None else mean
        std = self.latent_std if std is None else std
        t = torch.randint(0, mean.shape[1], (len(idx),), generator=gen)
        ii = torch.as_tensor(idx)
        m, s = mean[ii, t], std[ii, t]
        if self.cfg.latent_sampling == "sample":
            m = m + s * torch.randn(m.shape, generator=gen)
        sf = float(self.model.vae.config.scaling_factor)
        return (m * sf).to(self.device)

    def draw_noise(self, latents: torch.Tensor, gen: torch.Generator):
        noise = torch.randn(latents.shape, generator=gen).to(self.device)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (latents.shape[0],), generator=gen).to(self.device)
        return noise, timesteps

    def image_prompt(self, i: int) -> str:
        """Image ``i``'s training prompt: its own caption (captions=image, where it has one) or its class's."""
        if self.cfg.captions == "image":
            own = self.data.caption(i)
            if own:
                return own
        return self.class_prompt(self.data.labels[i])

    def prompts_for(self, idx: np.ndarray, gen: torch.Generator) -> list[str]:
        prompts = [self.image_prompt(int(i)) for i in idx]
        if self.cfg.caption_dropout > 0:
            drop = torch.rand(len(idx), generator=gen) < self.cfg.caption_dropout
            prompts = ["" if d else p for p, d in zip(prompts, drop.tolist(), strict=True)]
        return prompts

    @torch.no_grad()
    def cache_text(self, prompts) -> None:
        """Embeddings of each distinct prompt through the frozen text encoder (computed once)."""
        todo = sorted({p for p in prompts if p not in self.text_cache})
        te = self.model.text_encoder
        for s in range(0, len(todo), 32):
            chunk = todo[s : s + 32]
            ids = self.tokenize(chunk)
            emb = te(ids.to(te.device))[0]
            for p, e in zip(chunk, emb, strict=True):
                self.text_cache[p] = e.to(self.weight_dtype)

    def cached_text(self, prompts: list[str]) -> torch.Tensor:
        return torch.stack([self.text_cache[p] for p in prompts]).to(self.device)

    def all_prompts(self) -> list[str]:
        out = [self.class_prompt(c) for c in self.data.classes]
        if self.cfg.captions == "image":
            out += self.image_captions()
        if self.cfg.caption_dropout > 0:
            out.append("")
        return out

    def image_captions(self) -> list[str]:
        """The distinct per-image captions; says how many are cut at the text encoder's 77 tokens."""
        caps = sorted({c for c in self.data.captions if c}) if self.data.captions else []
        if not caps:
            self.log("captions=image, but the dataset gives no captions: every image trains on its class prompt")
            return []
        tok = self.model.tokenizer
        limit = tok.model_max_length
        long = sum(len(tok(c, truncation=False).input_ids) > limit for c in caps)
        missing = sum(1 for c in self.data.captions if not c)
        self.log(
            f"captions: {len(caps)} distinct per-image captions; {long} longer than {limit} tokens are truncated"
            + (f"; {missing} images without one use their class prompt" if missing else "")
        )
        self.truncated_captions = long
        return caps

    def tokenize(self, prompts: list[str], tokenizer=None) -> torch.Tensor:
        tok = tokenizer or self.model.tokenizer
        return tok(
            prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids

    def offload(self, *names: str) -> None:
        """Move frozen components the training step no longer needs to the CPU (GPU memory for the step)."""
        if torch.device(self.device).type == "cpu":
            return
        for n in names:
            m = getattr(self.model, n, None)
            if m is not None:
                m.to("cpu")

    def cast_frozen(self, *names: str) -> None:
        """Frozen components in the mixed-precision dtype (as diffusers' examples do: no fp32 copy needed)."""
        import torch

        if self.weight_dtype == torch.float32:
            return
        for n in names:
            m = getattr(self.model, n, None)
            if m is not None:
                m.to(dtype=self.weight_dtype)


def images_digest(images: list[Image.Image]) -> str:
    h = hashlib.sha256()
    for im in images:
        h.update(f"{im.mode}{im.size}".encode())
        h.update(im.tobytes())
    return h.hexdigest()
