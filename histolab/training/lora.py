"""LoRA on a text-conditioned base: low-rank updates on the U-Net (and optionally the text encoder).

Targets: ``attention`` (to_q/k/v/out of every attention layer, diffusers'
LoRA example) or ``transformer`` (every Linear and 1x1 conv of the transformer
blocks, kohya-ss sd-scripts' default); ``cross_attention_only`` restricts
either to the cross-attention (attn2) projections, as the chest X-ray study
did. Saved with histolab.adapters.lora.save (peft keys, diffusers metadata),
which diffusers' ``load_lora_weights`` also reads.
"""

from __future__ import annotations

from pathlib import Path

import torch

from histolab.training import lora_layers
from histolab.training.trainer import Trainer, TrainNet, eps_loss


class LoraNet(TrainNet):
    frozen = ("unet", "text_encoder")  # the base layers; the LoRA wrappers inside have no dropout

    def __init__(self, unet, text_encoder, scheduler, train_text: bool):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder if train_text else None
        self.scheduler = scheduler

    def forward(self, batch):
        cond = batch["cond"] if self.text_encoder is None else self.text_encoder(batch["input_ids"])[0]
        return eps_loss(self.unet, self.scheduler, batch["latents"], batch["noise"], batch["timesteps"], cond).mean()


class LoraTrainer(Trainer):
    kind = "lora"

    def prepare(self) -> None:
        cfg, model = self.cfg, self.model
        self.cache_training_latents()
        if not cfg.train_text_encoder:
            self.cache_text(self.all_prompts())
            self.offload("text_encoder")
        self.offload("vae")
        self.cast_frozen("unet", "text_encoder")
        self.alpha = float(cfg.alpha if cfg.alpha is not None else cfg.rank)
        pick = lora_layers.attention_targets if cfg.target == "attention" else lora_layers.transformer_targets
        torch.manual_seed(cfg.seed)
        self.unet_lora = lora_layers.inject(
            model.unet, pick(model.unet, cfg.cross_attention_only), cfg.rank, self.alpha, cfg.lora_init
        )
        self.te_lora = {}
        if cfg.train_text_encoder:
            rank = cfg.text_encoder_rank or cfg.rank
            self.te_lora = lora_layers.inject(
                model.text_encoder, lora_layers.text_encoder_targets(model.text_encoder), rank, self.alpha
            )
        if cfg.gradient_checkpointing:
            model.unet.enable_gradient_checkpointing()
            if cfg.train_text_encoder:
                model.text_encoder.gradient_checkpointing_enable()

    def network(self) -> LoraNet:
        return LoraNet(self.model.unet, self.model.text_encoder, self.noise_scheduler, self.cfg.train_text_encoder)

    def trainable_named(self):
        out = {}
        for comp, wrappers in (("unet", self.unet_lora), ("text_encoder", self.te_lora)):
            for path, w in wrappers.items():
                out[f"{comp}.{path}.down"] = w.down
                out[f"{comp}.{path}.up"] = w.up
        return out

    def param_groups(self):
        groups = [
            {
                "name": "unet-lora",
                "params": [p for w in self.unet_lora.values() for p in (w.down, w.up)],
                "lr": self.cfg.lr,
                "weight_decay": self.cfg.weight_decay,
            }
        ]
        if self.te_lora:
            groups.append(
                {
                    "name": "text-encoder-lora",
                    "params": [p for w in self.te_lora.values() for p in (w.down, w.up)],
                    "lr": self.cfg.text_encoder_lr or self.cfg.lr,
                    "weight_decay": self.cfg.weight_decay,
                }
            )
        return groups

    def batch(self, idx, gen):
        latents = self.draw_latents(idx, gen)
        noise, timesteps = self.draw_noise(latents, gen)
        prompts = self.prompts_for(idx, gen)
        out = {"latents": latents, "noise": noise, "timesteps": timesteps}
        if self.cfg.train_text_encoder:
            out["input_ids"] = self.tokenize(prompts).to(self.device)
        else:
            out["cond"] = self.cached_text(prompts)
        return out

    def save_adapter(self, folder: Path, manifest) -> None:
        from histolab.adapters import lora

        layers = []
        for comp, wrappers in (("unet", self.unet_lora), ("text_encoder", self.te_lora)):
            for path, w in wrappers.items():
                down, up = w.export()
                layers.append((comp, path, down, up))
        manifest.config.update(
            {
                "rank": self.cfg.rank,
                "alpha": self.alpha,
                "target": self.cfg.target,
                "cross_attention_only": self.cfg.cross_attention_only,
                "text_encoder": bool(self.te_lora),
            }
        )
        lora.save(folder, layers, self.alpha, manifest)

    def close(self) -> None:
        lora_layers.remove(self.model.unet, self.unet_lora)
        lora_layers.remove(self.model.text_encoder, self.te_lora)
