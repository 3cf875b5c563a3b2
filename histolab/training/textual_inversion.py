"""Textual inversion (Gal et al. 2023): new tokens, one per class, whose embedding vectors are learned.

Everything of the base stays frozen; gradients reach only the new rows, held
in a small table beside the base embedding (the base table is never resized
or written). Prompts are tokenised exactly as histolab.adapters applies the
result: the class token expands to its ``n_vectors`` tokens (``t t_1 ...``),
added to a copy of the tokenizer without normalisation. Saved as diffusers'
``learned_embeds.safetensors`` ({token: (n_vectors, width)}).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from histolab.errors import InvalidRequest
from histolab.training.data import label_slug
from histolab.training.trainer import Trainer, TrainNet, eps_loss


class TrainableTokens(torch.nn.Module):
    """The base token table plus trainable rows for ids >= ``start``."""

    def __init__(self, base: torch.nn.Embedding, extra: torch.Tensor, start: int):
        super().__init__()
        self.base = base
        self.start = start
        self.extra = torch.nn.Parameter(extra)
        self.num_embeddings = start + int(extra.shape[0])
        self.embedding_dim = base.embedding_dim

    @property
    def weight(self):
        return self.base.weight

    def forward(self, ids):
        new = ids >= self.start
        out = self.base(ids.clamp(max=self.base.num_embeddings - 1))
        rows = self.extra[(ids - self.start).clamp(min=0, max=self.extra.shape[0] - 1)]
        return torch.where(new[..., None], rows.to(out.dtype), out)


class TINet(TrainNet):
    frozen = ("unet", "text_encoder")  # the new rows inside the text encoder are the only trainables

    def __init__(self, unet, text_encoder, scheduler):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder
        self.scheduler = scheduler

    def forward(self, batch):
        cond = self.text_encoder(batch["input_ids"])[0]
        return eps_loss(self.unet, self.scheduler, batch["latents"], batch["noise"], batch["timesteps"], cond).mean()


class TextualInversionTrainer(Trainer):
    kind = "textual_inversion"

    def tokens(self) -> dict[str, str]:
        return {c: self.cfg.token_template.format(label=label_slug(c)) for c in self.data.classes}

    def class_prompt(self, label: str) -> str:
        return self.cfg.prompt_template.format(label=label_slug(label), token=self.tokens()[label])

    def prepare(self) -> None:
        from tokenizers import AddedToken

        from histolab.adapters.textual_inversion import EmbeddingTokenizer

        cfg, model = self.cfg, self.model
        self.cache_training_latents()
        self.offload("vae")
        self.cast_frozen("unet", "text_encoder")
        base_tok = model.tokenizer
        vocab = base_tok.get_vocab()
        self.class_tokens = self.tokens()
        expansions, all_tokens = {}, []
        for tok in self.class_tokens.values():
            if tok in vocab or tok + "</w>" in vocab or any(c.isspace() for c in tok):
                raise InvalidRequest(
                    f"`token_template` gives the token {tok!r}, which the tokenizer already has (or holds a space); "
                    "use a template such as '<{label}>'"
                )
            group = [tok] + [f"{tok}_{i}" for i in range(1, cfg.n_vectors)]
            expansions[tok] = " ".join(group)
            all_tokens += group
        inner = copy.deepcopy(base_tok)
        inner.add_tokens([AddedToken(t, normalized=False, single_word=False) for t in all_tokens])
        self.tokenizer = EmbeddingTokenizer(base_tok, inner, expansions)
        start = len(base_tok)
        ids = inner.convert_tokens_to_ids(all_tokens)
        if ids != list(range(start, start + len(all_tokens))):
            raise InvalidRequest(f"the tokenizer gave the new tokens ids {ids[:4]}..., not ids from {start} on")
        base_emb = model.text_encoder.get_input_embeddings()
        init_ids = base_tok(cfg.init_text, add_special_tokens=False).input_ids
        if not init_ids:
            raise InvalidRequest(f"`init_text` {cfg.init_text!r} gives no tokens")
        with torch.no_grad():
            init = base_emb.weight[torch.as_tensor(init_ids, device=base_emb.weight.device)].float().mean(0)
        extra = init.detach().cpu().repeat(len(all_tokens), 1).to(self.device)
        self.embedding = TrainableTokens(base_emb, extra, start)
        self._base_emb = base_emb
        model.text_encoder.set_input_embeddings(self.embedding)
        self.n_tokens = len(all_tokens)
        if cfg.gradient_checkpointing:
            model.unet.enable_gradient_checkpointing()
            model.text_encoder.gradient_checkpointing_enable()

    def network(self) -> TINet:
        return TINet(self.model.unet, self.model.text_encoder, self.noise_scheduler)

    def trainable_named(self):
        return {"embeddings": self.embedding.extra}

    def param_groups(self):
        return [
            {
                "name": "embeddings",
                "params": [self.embedding.extra],
                "lr": self.cfg.lr,
                "weight_decay": self.cfg.weight_decay,
            }
        ]

    def batch(self, idx, gen):
        latents = self.draw_latents(idx, gen)
        noise, timesteps = self.draw_noise(latents, gen)
        ids = self.tokenize(self.prompts_for(idx, gen), self.tokenizer).to(self.device)
        return {"latents": latents, "noise": noise, "timesteps": timesteps, "input_ids": ids}

    def vectors(self) -> dict[str, torch.Tensor]:
        """{class token: (n_vectors, width)} from the trained rows."""
        rows = self.embedding.extra.detach().float().cpu()
        n = self.cfg.n_vectors
        return {tok: rows[i * n : (i + 1) * n].clone() for i, tok in enumerate(self.class_tokens.values())}

    def save_adapter(self, folder: Path, manifest) -> None:
        from safetensors.torch import save_file

        from histolab.adapters import textual_inversion
        from histolab.adapters.manifest import write_manifest

        vecs = self.vectors()
        manifest.config.update(
            {"tokens": dict(self.class_tokens), "vectors": self.cfg.n_vectors, "init_text": self.cfg.init_text}
        )
        if len(vecs) == 1:
            token, v = next(iter(vecs.items()))
            textual_inversion.save(folder, token, v, manifest)
            return
        # Several classes: diffusers' multi-token layout ({token: vectors} per token) in one file;
        # the loader reads each key as its own trigger token.
        folder.mkdir(parents=True, exist_ok=True)
        out = folder / (manifest.weights or textual_inversion.WEIGHTS_NAME)
        save_file({t: v.contiguous() for t, v in vecs.items()}, str(out))
        manifest.weights = out.name
        manifest.trigger_token = ""
        write_manifest(folder, manifest)

    def close(self) -> None:
        self.model.text_encoder.set_input_embeddings(self._base_emb)
