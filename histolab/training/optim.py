"""The optimiser a config names, over the trainer's parameter groups.

``adamw`` and ``adam`` are torch's; ``adamw8bit`` is bitsandbytes' 8-bit AdamW
(the 2025 colon study's optimiser), which runs on CUDA only: asked for on a
CPU, or without bitsandbytes installed, it stops with what to do instead of
silently training with another optimiser.
"""

from __future__ import annotations

from histolab.errors import InvalidRequest


def build_optimizer(cfg, groups: list[dict], device) -> object:
    import torch

    kw = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps}
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, **kw)
    if cfg.optimizer == "adam":
        # Adam's weight_decay is L2 in the gradient; a group's own weight_decay still applies.
        return torch.optim.Adam(groups, **kw)
    if cfg.optimizer == "adamw8bit":
        if getattr(torch.device(device), "type", str(device)) != "cuda":
            raise InvalidRequest(
                f"optimizer adamw8bit (bitsandbytes' 8-bit AdamW) needs a CUDA GPU, but this run is on {device}; "
                "train on a GPU, or set optimizer=adamw (the same update in 32-bit state)"
            )
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise InvalidRequest(
                "optimizer adamw8bit needs bitsandbytes: `pip install bitsandbytes` on the GPU machine, "
                "or set optimizer=adamw"
            ) from None
        return bnb.optim.AdamW8bit(groups, **kw)
    raise InvalidRequest(f"unknown optimizer {cfg.optimizer!r}: choose adamw, adamw8bit or adam")
