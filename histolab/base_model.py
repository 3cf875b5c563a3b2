"""The loaded base model (SD 1.5 architecture): its components, what identifies it, and
``assemble``, the one way every loader (diffusers folder, single file, random init, the
embedded trainer) turns components into one.

Its own module, below ``pipeline`` and every loader, so that loaders never import
``pipeline`` back (``pipeline.load_base`` dispatches to them).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from histolab.config import EMBEDDED_BASE_ID
from histolab.errors import InvalidRequest
from histolab.files import short_hash

# A conditioning mode beside text (e.g. "reference", added by the projector
# adapter): fn(model, request, n) -> (cond, uncond, reference_hash, encoder_name),
# cond/uncond of shape (n, tokens, cross_attention_dim) for classifier-free guidance.
Conditioner = Callable[[Any, Any, int], tuple[Any, Any, str, str]]


@dataclass
class BaseModel:
    """The components of one loaded base model, and what identifies it."""

    source: str
    hash: str  # sha256 over the weight files, in a fixed order
    vae: Any
    unet: Any
    text_encoder: Any
    tokenizer: Any
    scheduler_config: dict[str, Any]
    device: Any = "cpu"
    dtype: Any = None
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    # Adapters currently applied (managed by histolab.adapters) and extra
    # conditioning modes they provide (e.g. "reference" from the projector).
    applied: list[Any] = field(default_factory=list)
    conditioners: dict[str, Conditioner] = field(default_factory=dict)
    # What optimize_for_inference changed (memory format, compile); for logs and benchmarks.
    optimizations: dict[str, Any] = field(default_factory=dict)
    # Embeddings of recent prompts (histolab.prompt_cache); the key sees adapters and weight edits.
    prompt_cache: Any = field(default=None, repr=False)
    # The U-Net as frozen graphs (histolab.traced), set by optimize_for_inference(trace=True).
    traced_unet: Any = field(default=None, repr=False)
    # Its ahead-of-time compiled packages (histolab.compiled_unet), set with traced_unet on CPU.
    compiled_unets: Any = field(default=None, repr=False)

    @property
    def short_hash(self) -> str:
        return short_hash(self.hash)

    @property
    def name(self) -> str:
        return EMBEDDED_BASE_ID if self.source == EMBEDDED_BASE_ID else Path(self.source).name or self.source

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """Width and height must be multiples of this: the VAE's factor times the U-Net's downsampling."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def default_size(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def cross_attention_dim(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    def encode_prompt(self, prompts: list[str]):
        """CLIP text embeddings, padded to the tokenizer's length as SD 1.5 does."""
        import torch

        tok = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        with torch.inference_mode():
            return self.text_encoder(tok.input_ids.to(self.device))[0].to(self.dtype)

    def prompt_embedding(self, prompt: str):
        """``encode_prompt([prompt])``, from the cache when nothing it depends on changed."""
        if self.prompt_cache is None:
            from histolab.prompt_cache import PromptCache

            self.prompt_cache = PromptCache()
        return self.prompt_cache.get(self, prompt, self.encode_prompt)

    def modules(self) -> dict[str, Any]:
        return {"vae": self.vae, "unet": self.unet, "text_encoder": self.text_encoder}


def assemble(source, digest, vae, unet, text_encoder, tokenizer, scheduler_config, device, dtype) -> BaseModel:
    """A ``BaseModel`` from loaded components: moved to ``device``/``dtype``, frozen in eval mode,
    and checked to fit together (text width = the U-Net's cross-attention width)."""
    for m in (vae, unet, text_encoder):
        p = next(m.parameters())
        if p.device != __import__("torch").device(device) or p.dtype != dtype:
            m.to(device=device, dtype=dtype)
        m.eval()
        m.requires_grad_(False)
    if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
        raise InvalidRequest(
            f"text encoder width {text_encoder.config.hidden_size} does not match the U-Net's "
            f"cross-attention width {unet.config.cross_attention_dim}"
        )
    return BaseModel(
        source=source,
        hash=digest,
        vae=vae,
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler_config=scheduler_config,
        device=device,
        dtype=dtype,
    )
