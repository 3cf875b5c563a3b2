"""Helpers shared by the tests/test_adapters_*.py files: snapshots of a model,
generation to pixels, files in other tools' published layouts, a seeded encoder."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from histolab.adapters.kohya import kohya_name, to_ldm
from histolab.generation import AdapterSpec, GenerationRequest, generate

PROMPT = "an h&e stained histology image of colon tissue"


# ------------------------------------------------------------- model state


def snapshot(model) -> dict:
    """Everything applying adapters may touch, copied (tensors) or by identity (objects)."""
    return {
        "tensors": {c: {k: v.detach().clone() for k, v in m.state_dict().items()} for c, m in model.modules().items()},
        "storage": {c: {k: v.data_ptr() for k, v in m.state_dict().items()} for c, m in model.modules().items()},
        "tokenizer": model.tokenizer,
        "vocab": len(model.tokenizer),
        "embedding": model.text_encoder.get_input_embeddings(),
        "processors": dict(model.unet.attn_processors),
        "conditioners": dict(model.conditioners),
        "applied": list(model.applied),
    }


def assert_restored(model, snap: dict) -> None:
    for comp, tensors in snap["tensors"].items():
        now = getattr(model, comp).state_dict()
        assert list(now) == list(tensors), f"{comp}: state-dict keys changed"
        for k, v in tensors.items():
            assert now[k].dtype == v.dtype and torch.equal(now[k], v), f"{comp}.{k} changed"
            assert now[k].data_ptr() == snap["storage"][comp][k], f"{comp}.{k} is not the original tensor"
    assert model.tokenizer is snap["tokenizer"] and len(model.tokenizer) == snap["vocab"]
    assert model.text_encoder.get_input_embeddings() is snap["embedding"]
    now = model.unet.attn_processors
    assert now.keys() == snap["processors"].keys()
    assert all(now[k] is snap["processors"][k] for k in now), "attention processors not restored"
    assert model.conditioners == snap["conditioners"]
    assert model.applied == snap["applied"]
    hooks = [n for c, m in model.modules().items() for n, mod in m.named_modules(prefix=c) if mod._forward_hooks]
    assert not hooks, f"forward hooks left on {hooks[:3]}"


def request(adapters=(), **kw) -> GenerationRequest:
    # One denoising step: every comparison here is between runs of the same request, which one step
    # already tells apart (or shows equal); a second step only doubled the U-Net work.
    base = dict(prompt=PROMPT, steps=1, guidance_scale=3.0, seed=5)
    base.update(kw)
    specs = tuple(a if isinstance(a, AdapterSpec) else AdapterSpec(str(a[0]), a[1]) for a in adapters)
    return GenerationRequest(adapters=specs, **base)


def pixels(model, adapters=(), **kw) -> np.ndarray:
    return np.asarray(generate(model, request(adapters, **kw))[0].image).astype(np.int16)


# ----------------------------------------------------------- LoRA layouts


def kohya_lora_state(
    model,
    *,
    seed: int = 0,
    rank: int = 4,
    alpha: float | None = 2.0,
    names: str = "diffusers",
    unet_filter=lambda name, mod: "attentions" in name,
    text_encoder: bool = True,
    scale: float = 0.3,
) -> dict[str, torch.Tensor]:
    """A kohya-ss / SD-webui LoRA (lora_unet_* / lora_te_* keys, .lora_down/.lora_up/.alpha) for ``model``.

    ``names``: "diffusers" (lora_unet_down_blocks_1_attentions_0_...) or "ldm" (lora_unet_input_blocks_4_1_...).
    Conv layers get conv-LoRA (LoCon) tensors: down with the layer's kernel, up 1x1.
    """
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def add(key, mod):
        if isinstance(mod, torch.nn.Conv2d):
            down = torch.randn(rank, mod.in_channels, *mod.kernel_size, generator=g) * scale
            up = torch.randn(mod.out_channels, rank, 1, 1, generator=g) * scale
        else:
            down = torch.randn(rank, mod.in_features, generator=g) * scale
            up = torch.randn(mod.out_features, rank, generator=g) * scale
        sd[f"{key}.lora_down.weight"] = down
        sd[f"{key}.lora_up.weight"] = up
        if alpha is not None:
            sd[f"{key}.alpha"] = torch.tensor(float(alpha))

    for name, mod in model.unet.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and unet_filter(name, mod):
            path = to_ldm(name, model.unet.config) if names == "ldm" else name
            add(kohya_name("lora_unet_", path), mod)
    if text_encoder:
        for name, mod in model.text_encoder.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".layers." in name:
                add(kohya_name("lora_te_", name), mod)
    return sd


def save_safetensors(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


# ------------------------------------------------------------ an encoder


class SeededEncoder:
    """A small convolutional image encoder with seeded weights, following histolab's ImageEncoder protocol.

    It counts calls to ``encode`` so tests can see the embedding cache at work.
    """

    def __init__(self, name: str = "test-seeded", dim: int = 48, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.name, self.dim = name, dim
        self.conv = torch.randn(16, 3, 4, 4, generator=g) * 0.2
        self.proj = torch.randn(dim, 16 * 4, generator=g) * 0.2
        h = hashlib.sha256()
        for t in (self.conv, self.proj):
            h.update(t.numpy().tobytes())
        self.weights_hash = h.hexdigest()
        self.calls = 0

    def transform(self, images):
        arrs = [np.asarray(im.convert("RGB").resize((32, 32)), dtype=np.float32) / 127.5 - 1 for im in images]
        return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2)

    @torch.no_grad()
    def encode(self, images):
        self.calls += 1
        x = torch.nn.functional.conv2d(self.transform(images), self.conv, stride=4)  # (n, 16, 8, 8)
        x = torch.nn.functional.adaptive_avg_pool2d(torch.tanh(x), 2).flatten(1)  # (n, 64)
        return x @ self.proj.T


# ------------------------------------------------------- a pipeline folder


def save_pipeline(model, folder: Path) -> Path:
    """``model`` as a diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/)."""
    from histolab.pipeline import save_pipeline_folder

    return save_pipeline_folder(model, folder)


def meta_model(arch: str = "sd15"):
    """A BaseModel whose networks have ``arch``'s shapes on the meta device (no memory): for shape checks."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from histolab.embedded.architecture import ARCHITECTURES
    from histolab.embedded.random_init import tokenizer_dir
    from histolab.pipeline import BaseModel

    a = ARCHITECTURES[arch] if isinstance(arch, str) else arch
    with init_empty_weights():
        unet = UNet2DConditionModel(**a.unet)
        vae = AutoencoderKL(**a.vae)
        te = CLIPTextModel(CLIPTextConfig(**a.text_encoder))
    return BaseModel(
        source=f"meta-{a.name}",
        hash="0" * 64,
        vae=vae,
        unet=unet,
        text_encoder=te,
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir()),
        scheduler_config={},
        device="meta",
    )


def ldm_vae_state(vae) -> dict[str, torch.Tensor]:
    """``vae``'s weights under LDM names (``first_stage_model.*``), as SD-webui checkpoints store them."""
    import re

    n_up = len(vae.config.block_out_channels)
    res = {"conv_shortcut": "nin_shortcut"}
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for k, v in vae.state_dict().items():
        name = k.replace("conv_norm_out", "norm_out")
        m = re.match(
            r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)", name
        )
        if m:
            side, _, i, kind, j, rest = m.groups()
            i = int(i) if side == "encoder" else n_up - 1 - int(i)  # LDM numbers decoder levels bottom-up
            head, _, leaf = rest.rpartition(".")
            if kind == "resnets":
                name = f"{side}.{'down' if side == 'encoder' else 'up'}.{i}.block.{j}.{res.get(head, head)}.{leaf}"
            else:
                sampler = "downsample" if kind == "downsamplers" else "upsample"
                name = f"{side}.{'down' if side == 'encoder' else 'up'}.{i}.{sampler}.{rest}"
        m = re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)", name)
        if m:
            side, kind, j, rest = m.groups()
            head, _, leaf = rest.rpartition(".")
            if kind == "resnets":
                name = f"{side}.mid.block_{int(j) + 1}.{res.get(head, head)}.{leaf}"
            else:
                name = f"{side}.mid.attn_1.{attn[head]}.{leaf}"
                if head in ("to_q", "to_k", "to_v", "to_out.0") and leaf == "weight":
                    v = v[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        out[f"first_stage_model.{name}"] = v
    return out
