"""DreamBooth (Ruiz et al. 2023): the U-Net (and optionally the text encoder) fine-tuned in full,
with the prior-preservation loss on class images the base model generates before training.

Class images are made by histolab.generation.generate from the frozen base
with ``class_prompt`` and fixed seeds, once, and kept (with their latents) in
the run's folder, so a resumed run reuses them. Each step trains on a batch of
instance images and an equal batch of class images:
``loss = mse(instance) + prior_loss_weight * mse(class)``.

Saved with histolab.adapters.dreambooth.save: ``unet/`` (and ``text_encoder/``)
diffusers folders in ``save_dtype`` beside the manifest; the resume state
keeps float32 weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from histolab.training.trainer import Trainer, TrainNet, eps_loss


class DreamBoothNet(TrainNet):
    def __init__(self, unet, text_encoder, scheduler, train_text: bool, prior_weight: float):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder if train_text else None
        self.scheduler = scheduler
        self.prior_weight = prior_weight

    def forward(self, batch):
        cond = batch["cond"] if self.text_encoder is None else self.text_encoder(batch["input_ids"])[0]
        per = eps_loss(self.unet, self.scheduler, batch["latents"], batch["noise"], batch["timesteps"], cond)
        n = batch["n_instance"]
        loss = per[:n].mean()
        if per.shape[0] > n:
            loss = loss + self.prior_weight * per[n:].mean()
        return loss


class DreamBoothTrainer(Trainer):
    kind = "dreambooth"

    def prepare(self) -> None:
        cfg, model = self.cfg, self.model
        self.cache_training_latents()
        self.class_labels: list[str] = []
        if cfg.prior_preservation:
            class_images = self.class_images()
            self.class_mean, self.class_std = self.encode_latents(class_images, "class")
        if not cfg.train_text_encoder:
            self.cache_text([*self.all_prompts(), cfg.class_prompt])
            self.offload("text_encoder")
            self.cast_frozen("text_encoder")
        self.offload("vae")
        model.unet.requires_grad_(True)
        if cfg.train_text_encoder:
            model.text_encoder.requires_grad_(True)
        if cfg.gradient_checkpointing:
            model.unet.enable_gradient_checkpointing()
            if cfg.train_text_encoder:
                model.text_encoder.gradient_checkpointing_enable()

    def class_images(self) -> list[Image.Image]:
        """``num_class_images`` images of ``class_prompt`` from the frozen base, generated once and kept."""
        from histolab.generation import GenerationRequest

        cfg = self.cfg
        key = self.cache_key(
            self.model.hash,
            cfg.class_prompt,
            cfg.class_image_steps,
            cfg.sample_guidance,
            cfg.sample_scheduler,
            self.resolution,
            cfg.seed,
        )
        folder = self.workdir / f"class-images-{key}"
        files = [folder / f"{i:05d}.png" for i in range(cfg.num_class_images)]
        todo = [i for i, f in enumerate(files) if not f.is_file()]
        if todo:
            folder.mkdir(parents=True, exist_ok=True)
            self.log(f"generating {len(todo)} class images for prior preservation ({cfg.class_prompt!r})")
            for s in range(0, len(todo), 8):
                chunk = todo[s : s + 8]
                req = GenerationRequest(
                    prompt=cfg.class_prompt,
                    steps=cfg.class_image_steps,
                    guidance_scale=cfg.sample_guidance,
                    scheduler=cfg.sample_scheduler,
                    width=self.resolution,
                    height=self.resolution,
                )
                seeds = [cfg.seed * 100_003 + 7_000_000 + i for i in chunk]
                images = self.sampler.generate(None, [req], seeds=seeds)
                for i, im in zip(chunk, images, strict=True):
                    from histolab.training.state import atomic_write

                    atomic_write(files[i], lambda tmp, im=im: im.save(tmp, format="PNG"))
                self.progress("class-images", f"class images {s + len(chunk)}/{len(todo)}")
        out = []
        for f in files:
            with Image.open(f) as im:
                out.append(im.convert("RGB"))
        return out

    def network(self) -> DreamBoothNet:
        cfg = self.cfg
        return DreamBoothNet(
            self.model.unet,
            self.model.text_encoder,
            self.noise_scheduler,
            cfg.train_text_encoder,
            cfg.prior_loss_weight,
        )

    def trainable_named(self):
        out = {f"unet.{k}": p for k, p in self.model.unet.named_parameters()}
        if self.cfg.train_text_encoder:
            out.update({f"text_encoder.{k}": p for k, p in self.model.text_encoder.named_parameters()})
        return out

    def param_groups(self):
        groups = [
            {
                "name": "unet",
                "params": list(self.model.unet.parameters()),
                "lr": self.cfg.lr,
                "weight_decay": self.cfg.weight_decay,
            }
        ]
        if self.cfg.train_text_encoder:
            groups.append(
                {
                    "name": "text-encoder",
                    "params": list(self.model.text_encoder.parameters()),
                    "lr": self.cfg.text_encoder_lr or self.cfg.lr,
                    "weight_decay": self.cfg.weight_decay,
                }
            )
        return groups

    def batch(self, idx, gen):
        cfg = self.cfg
        latents = self.draw_latents(idx, gen)
        prompts = self.prompts_for(idx, gen)
        n = len(idx)
        if cfg.prior_preservation:
            cidx = torch.randint(0, self.class_mean.shape[0], (n,), generator=gen).numpy()
            latents = torch.cat([latents, self.draw_latents(cidx, gen, self.class_mean, self.class_std)])
            prompts = prompts + [cfg.class_prompt] * n
        noise, timesteps = self.draw_noise(latents, gen)
        out = {"latents": latents, "noise": noise, "timesteps": timesteps, "n_instance": n}
        if cfg.train_text_encoder:
            out["input_ids"] = self.tokenize(prompts).to(self.device)
        else:
            out["cond"] = self.cached_text(prompts)
        return out

    def save_adapter(self, folder: Path, manifest) -> None:
        from histolab.adapters import dreambooth

        dtype = getattr(torch, self.cfg.save_dtype)
        manifest.config.update(
            {
                "components": ["unet"] + (["text_encoder"] if self.cfg.train_text_encoder else []),
                "dtype": self.cfg.save_dtype,
            }
        )
        unet = cpu_copy(self.model.unet, dtype)
        te = cpu_copy(self.model.text_encoder, dtype) if self.cfg.train_text_encoder else None
        dreambooth.save(folder, manifest, unet=unet, text_encoder=te)


def cpu_copy(module, dtype):
    """A copy of ``module`` on the CPU in ``dtype``, built without a second full-precision copy."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        clone = (
            type(module).from_config(module.config)
            if hasattr(type(module), "from_config")
            else type(module)(module.config)
        )
    sd = {
        k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
        for k, v in module.state_dict().items()
    }
    clone.load_state_dict(sd, assign=True, strict=True)
    return clone.eval()
