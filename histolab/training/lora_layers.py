"""Trainable LoRA layers: wrap a Linear or 1x1 Conv2d as ``base(x) + scale * up(down(x))``.

The wrapper replaces the layer in its parent for the duration of training (so
the LoRA parameters are registered in the network: DDP synchronises them and
``accelerate`` casts them), and ``remove`` puts the original layer back. The
initialisation is peft's and kohya-ss's: ``down`` Kaiming-uniform, ``up``
zeros, so training starts from the base model exactly.
"""

from __future__ import annotations

import math

import torch

# The 1x1 convolutions SD 1.5's transformer blocks use for proj_in/proj_out.
CONV_1X1 = (1, 1)


class LoraWrapper(torch.nn.Module):
    def __init__(self, base: torch.nn.Module, rank: int, alpha: float, init: str = "kaiming"):
        super().__init__()
        self.base = base
        conv = isinstance(base, torch.nn.Conv2d)
        if conv and (tuple(base.kernel_size) != CONV_1X1 or base.groups != 1):
            raise ValueError(f"LoRA wrapper supports Linear and 1x1 Conv2d, not {base}")
        self.conv = conv
        n_in = base.in_channels if conv else base.in_features
        n_out = base.out_channels if conv else base.out_features
        self.down = torch.nn.Parameter(torch.empty(rank, n_in))
        self.up = torch.nn.Parameter(torch.zeros(n_out, rank))
        if init == "gaussian":  # peft's init_lora_weights="gaussian": N(0, 1/rank)
            torch.nn.init.normal_(self.down, std=1.0 / rank)
        else:
            torch.nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))
        self.scale = float(alpha) / rank

    def forward(self, x):
        out = self.base(x)
        down, up = self.down.to(x.dtype), self.up.to(x.dtype)
        if self.conv:
            h = torch.nn.functional.conv2d(x, down[:, :, None, None])
            return out + self.scale * torch.nn.functional.conv2d(h, up[:, :, None, None])
        return out + self.scale * torch.nn.functional.linear(torch.nn.functional.linear(x, down), up)

    def export(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up) as histolab.adapters.lora.save takes them: 2-D for Linear, 4-D for a 1x1 conv."""
        down, up = self.down.detach().float().cpu(), self.up.detach().float().cpu()
        if self.conv:
            return down[:, :, None, None], up[:, :, None, None]
        return down, up


def inject(
    root: torch.nn.Module, paths: list[str], rank: int, alpha: float, init: str = "kaiming"
) -> dict[str, LoraWrapper]:
    """Wrap each named module of ``root``; returns {path: wrapper} in the given order."""
    out = {}
    for path in paths:
        parent_path, _, leaf = path.rpartition(".")
        parent = root.get_submodule(parent_path) if parent_path else root
        base = getattr(parent, leaf) if not leaf.isdigit() else parent[int(leaf)]
        w = LoraWrapper(base, rank, alpha, init)
        w.to(device=_device(base))
        if leaf.isdigit():
            parent[int(leaf)] = w
        else:
            setattr(parent, leaf, w)
        out[path] = w
    return out


def remove(root: torch.nn.Module, wrappers: dict[str, LoraWrapper]) -> None:
    """Put the original layers back."""
    for path, w in wrappers.items():
        parent_path, _, leaf = path.rpartition(".")
        parent = root.get_submodule(parent_path) if parent_path else root
        if leaf.isdigit():
            parent[int(leaf)] = w.base
        else:
            setattr(parent, leaf, w.base)


def _device(m: torch.nn.Module):
    return next(m.parameters()).device


# ------------------------------------------------------------ target sets


def attention_targets(unet, cross_only: bool = False) -> list[str]:
    """to_q/to_k/to_v/to_out.0 of every U-Net attention layer (or of the cross-attention layers only)."""
    out = []
    for proc in unet.attn_processors:
        attn = proc.removesuffix(".processor")
        if cross_only and not attn.endswith("attn2"):
            continue
        out += [f"{attn}.{t}" for t in ("to_q", "to_k", "to_v", "to_out.0")]
    return out


def transformer_targets(unet, cross_only: bool = False) -> list[str]:
    """Every Linear and 1x1 Conv2d inside the U-Net's transformer blocks (kohya-ss sd-scripts' default LoRA set).

    With ``cross_only``, only the cross-attention (attn2) projections.
    """
    if cross_only:
        return attention_targets(unet, cross_only=True)
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    out = []
    for name, mod in unet.named_modules():
        if not isinstance(mod, Transformer2DModel):
            continue
        for sub, m in mod.named_modules():
            if isinstance(m, torch.nn.Linear) or (
                isinstance(m, torch.nn.Conv2d) and tuple(m.kernel_size) == CONV_1X1 and m.groups == 1
            ):
                out.append(f"{name}.{sub}")
    return out


def text_encoder_targets(text_encoder) -> list[str]:
    """q/k/v/out projections and the MLP of every CLIP encoder layer (kohya-ss's and diffusers' text-encoder set)."""
    out = []
    for name, m in text_encoder.named_modules():
        if (
            isinstance(m, torch.nn.Linear)
            and ".layers." in name
            and name.rsplit(".", 1)[-1]
            in (
                "q_proj",
                "k_proj",
                "v_proj",
                "out_proj",
                "fc1",
                "fc2",
            )
        ):
            out.append(name)
    return out
