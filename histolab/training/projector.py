"""The foundation-embedding adapter, trained as Algorithm 1 of Kuzmin & Berezsky 2026.

Per step: latents z0 and encoder embeddings e (both computed once, since the
VAE and the encoder are frozen); for each sample, with probability
``cond_dropout`` (0.1), e is replaced by the learned null embedding *before*
projection; the projector (with dropout 0.05 after its hidden activations)
maps e to ``n_tokens`` conditioning tokens that go to the U-Net's
cross-attention in place of text; LoRA on Q/K/V/O of every attention layer;
epsilon-prediction MSE on the base's noise schedule. AdamW (0.9, 0.999) with
two groups: LoRA (lr 5e-5, weight decay 1e-3) and projector + null embedding
(lr 5e-4, weight decay 1e-4); cosine decay after about one epoch of linear
warm-up (the loop's schedule). The text encoder is not used.

The encoder is resolved by name (histolab.encoders.get_encoder) unless one
is passed in; anything with the ImageEncoder protocol works.
"""

from __future__ import annotations

from pathlib import Path

import torch

from histolab.errors import ModelNotFound
from histolab.training import lora_layers
from histolab.training.trainer import Trainer, TrainNet, eps_loss


class ProjectorHead(torch.nn.Module):
    """The projector and the null embedding, trained together (one parameter group)."""

    def __init__(self, projector, encoder_dim: int, dropout: float, null_init_std: float = 0.01):
        super().__init__()
        self.projector = projector
        # Small random (the 2026 paper: scale 0.01), drawn under the run's seed; learned from the dropped samples.
        self.null_embedding = torch.nn.Parameter(torch.randn(encoder_dim) * null_init_std)
        self.dropout = dropout

    def forward(self, embeddings, drop):
        e = torch.where(drop[:, None], self.null_embedding[None].to(embeddings.dtype), embeddings)
        x = e
        for layer in self.projector.net:
            x = layer(x)
            if isinstance(layer, torch.nn.SiLU):
                x = torch.nn.functional.dropout(x, self.dropout, self.training)
        cfg = self.projector.cfg
        return x.view(e.shape[0], cfg.n_tokens, cfg.cross_attention_dim)


class ProjectorNet(TrainNet):
    frozen = ("unet",)  # LoRA wrappers inside have no dropout; the head trains

    def __init__(self, unet, head: ProjectorHead, scheduler):
        super().__init__()
        self.unet = unet
        self.head = head
        self.scheduler = scheduler

    def forward(self, batch):
        tokens = self.head(batch["embeddings"], batch["drop"])
        return eps_loss(self.unet, self.scheduler, batch["latents"], batch["noise"], batch["timesteps"], tokens).mean()


class ProjectorTrainer(Trainer):
    kind = "projector"
    uses_text = False

    def resolve_encoder(self):
        if self.encoder is not None:
            return self.encoder
        try:
            from histolab.encoders import get_encoder
        except ImportError as exc:
            raise ModelNotFound(
                f"image encoder {self.cfg.encoder!r} is needed, but the encoder registry "
                f"(histolab.encoders.get_encoder) is not available in this installation: {exc}"
            ) from exc
        self.encoder = get_encoder(self.cfg.encoder, device=str(self.device))
        return self.encoder

    @torch.no_grad()
    def cache_embeddings(self) -> torch.Tensor:
        """(N, T, dim) encoder embeddings of every training image under every transform, computed once."""
        from PIL import Image
        from safetensors.torch import load_file, save_file

        from histolab.training.state import atomic_write
        from histolab.training.trainer import dihedral, images_digest

        enc = self.encoder
        key = self.cache_key(enc.name, str(enc.weights_hash), images_digest(self.data.images), self.transforms)
        path = self.workdir / f"embeddings-{key}.safetensors"
        if path.is_file():
            return load_file(str(path))["embeddings"]
        import numpy as np

        n, n_t = len(self.data.images), len(self.transforms)
        out = torch.empty((n, n_t, int(enc.dim)))
        flat = [(i, t) for i in range(n) for t in range(n_t)]
        bs = self.cfg.encoder_batch_size
        for s in range(0, len(flat), bs):
            chunk = flat[s : s + bs]
            ims = [
                Image.fromarray(dihedral(np.asarray(self.data.images[i].convert("RGB")), self.transforms[t]))
                for i, t in chunk
            ]
            e = torch.as_tensor(enc.encode(ims)).float().cpu()
            if tuple(e.shape) != (len(chunk), int(enc.dim)):
                raise ModelNotFound(f"encoder {enc.name!r} returned shape {list(e.shape)} for {len(chunk)} images")
            for j, (i, t) in enumerate(chunk):
                out[i, t] = e[j]
            self.progress("caching", f"encoder embeddings {s + len(chunk)}/{len(flat)}")
        atomic_write(path, lambda tmp: save_file({"embeddings": out.contiguous()}, str(tmp)))
        return out

    def prepare(self) -> None:
        from histolab.adapters.projector import Projector, ProjectorConfig, attention_lora_modules

        cfg, model = self.cfg, self.model
        enc = self.resolve_encoder()
        self.cache_training_latents()
        self.embeddings = self.cache_embeddings()
        self.offload("vae", "text_encoder")
        self.cast_frozen("unet")
        self.alpha = float(cfg.alpha if cfg.alpha is not None else cfg.rank)
        self.pcfg = ProjectorConfig(
            encoder_dim=int(enc.dim),
            cross_attention_dim=model.cross_attention_dim,
            n_tokens=cfg.n_tokens,
            depth=cfg.depth,
            hidden=cfg.hidden,
            rank=cfg.rank,
            alpha=self.alpha,
        )
        torch.manual_seed(cfg.seed)
        self.head = ProjectorHead(Projector(self.pcfg), int(enc.dim), cfg.projector_dropout, cfg.null_init_std).to(
            self.device
        )
        self.lora = lora_layers.inject(model.unet, attention_lora_modules(model.unet), cfg.rank, self.alpha)
        if cfg.gradient_checkpointing:
            model.unet.enable_gradient_checkpointing()

    def network(self) -> ProjectorNet:
        return ProjectorNet(self.model.unet, self.head, self.noise_scheduler)

    def trainable_named(self):
        out = {f"lora.{p}.down": w.down for p, w in self.lora.items()}
        out.update({f"lora.{p}.up": w.up for p, w in self.lora.items()})
        out.update({f"head.{k}": v for k, v in self.head.named_parameters()})
        return out

    def param_groups(self):
        cfg = self.cfg
        return [
            {
                "name": "lora",
                "params": [p for w in self.lora.values() for p in (w.down, w.up)],
                "lr": cfg.lr,
                "weight_decay": cfg.weight_decay,
            },
            {
                "name": "projector",
                "params": list(self.head.parameters()),
                "lr": cfg.projector_lr,
                "weight_decay": cfg.projector_weight_decay,
            },
        ]

    def batch(self, idx, gen):
        cfg = self.cfg
        t = torch.randint(0, self.embeddings.shape[1], (len(idx),), generator=gen)
        ii = torch.as_tensor(idx)
        # The same transform for the latent and the embedding of a sample: they show the same image.
        m, s = self.latent_mean[ii, t], self.latent_std[ii, t]
        if cfg.latent_sampling == "sample":
            m = m + s * torch.randn(m.shape, generator=gen)
        latents = (m * float(self.model.vae.config.scaling_factor)).to(self.device)
        emb = self.embeddings[ii, t].to(self.device)
        drop = (torch.rand(len(idx), generator=gen) < cfg.cond_dropout).to(self.device)
        noise, timesteps = self.draw_noise(latents, gen)
        return {"latents": latents, "noise": noise, "timesteps": timesteps, "embeddings": emb, "drop": drop}

    def sample_requests(self, per_class: int, seed: int, labels_out: list[str]):
        """Reference-mode requests: ``per_class`` validation patches of each class, one image each."""
        import numpy as np

        from histolab.generation import GenerationRequest

        data = self.data
        refs = data.val_images or data.images
        ref_labels = data.val_labels if data.val_images else data.labels
        out = []
        for ci, label in enumerate(data.classes):
            idx = [i for i, lab in enumerate(ref_labels) if lab == label]
            if not idx:
                continue
            rng = np.random.default_rng([seed, ci])
            pick = [idx[j] for j in rng.choice(len(idx), size=per_class, replace=len(idx) < per_class)]
            for k, i in enumerate(pick):
                out.append(
                    GenerationRequest(
                        mode="reference",
                        reference=refs[i],
                        steps=self.cfg.sample_steps,
                        guidance_scale=self.cfg.sample_guidance,
                        scheduler=self.cfg.sample_scheduler,
                        seed=seed + 1000 * ci + k,
                        width=self.resolution,
                        height=self.resolution,
                    )
                )
                labels_out.append(label)
        return out

    def validation_requests(self, seed: int, labels_out: list[str]):
        """One reference-mode generation per validation image, seeded per image (the 2026 protocol)."""
        from histolab.generation import GenerationRequest
        from histolab.training.validation import subset

        # The validation images the FID reference uses (the same seeded subset when there are more than
        # val_reference_images), each drawn once from its own embedding.
        refs, labels = subset(self.data.val_images, self.data.val_labels, self.cfg.val_reference_images, self.cfg.seed)
        out = []
        for i, (ref, label) in enumerate(zip(refs, labels, strict=True)):
            out.append(
                GenerationRequest(
                    mode="reference",
                    reference=ref,
                    steps=self.cfg.sample_steps,
                    guidance_scale=self.cfg.sample_guidance,
                    scheduler=self.cfg.sample_scheduler,
                    seed=seed + i,
                    width=self.resolution,
                    height=self.resolution,
                )
            )
            labels_out.append(label)
        return out

    def save_adapter(self, folder: Path, manifest) -> None:
        from histolab.adapters import projector as pj

        proj = pj.Projector(self.pcfg)
        proj.load_state_dict({k: v.detach().float().cpu() for k, v in self.head.projector.state_dict().items()})
        layers = [(p, *w.export()) for p, w in self.lora.items()]
        enc = self.encoder
        info = {"name": str(enc.name), "weights_hash": str(enc.weights_hash), "dim": int(enc.dim)}
        # The settings it was validated with are the ones generation should use by default.
        manifest.recommended = {
            "guidance_scale": float(self.cfg.sample_guidance),
            "scheduler": str(self.cfg.sample_scheduler),
            "steps": int(self.cfg.sample_steps),
        }
        # save() puts the projector's own settings in manifest.config; the training-only ones are in `training`.
        pj.save(folder, proj, self.head.null_embedding, layers, info, manifest)

    def close(self) -> None:
        lora_layers.remove(self.model.unet, self.lora)
