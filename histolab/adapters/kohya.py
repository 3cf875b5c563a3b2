"""Module names in the three spellings that LoRA files use, for one base model.

* diffusers / peft: ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``
  (and transformers' ``text_model.encoder.layers.0.self_attn.q_proj``);
* kohya-ss sd-scripts and SD-webui: the same path with ``.`` turned into ``_``
  behind a prefix, ``lora_unet_down_blocks_1_attentions_0_..._attn1_to_q`` and
  ``lora_te_text_model_encoder_layers_0_self_attn_q_proj``;
* text-encoder names in two generations: transformers 4 nests CLIPTextModel's
  layers under ``text_model.``; transformers 5 flattened it
  (``encoder.layers.0...``). Nearly every file in the wild has the prefix, so
  both spellings are looked up whichever transformers loaded the model;
* the LDM (CompVis / SGM) spelling of the original Stable Diffusion code, which
  some trainers write: ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``.

Names with ``_`` in them cannot be split back reliably, so instead of parsing
we build every spelling from the loaded model's own modules and look the file's
names up. This works for any SD-1.5-family U-Net (the embedded default, the
tiny test model, SD 1.5 itself), including on a meta-device model.
"""

from __future__ import annotations

import re
import weakref

# ResnetBlock2D sub-modules and their LDM ResBlock names.
RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
TOP_LEVEL_TO_LDM = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}

_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.*))?$")
_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?$")


def _layers_per_block(config) -> int:
    lpb = config.layers_per_block
    if isinstance(lpb, int):
        return lpb
    if len(set(lpb)) == 1:
        return int(lpb[0])
    raise ValueError("LDM block names need the same layers_per_block in every block")


def _inner(kind: str, rest: str | None) -> str:
    if rest is None:
        return ""
    if kind == "resnets":
        head, _, tail = rest.partition(".")
        rest = RESNET_TO_LDM.get(head, head) + (f".{tail}" if tail else "")
    return "." + rest


def to_ldm(name: str, config) -> str | None:
    """The LDM name of a U-Net module (without ``model.diffusion_model.``), or None."""
    for prefix, ldm in TOP_LEVEL_TO_LDM.items():
        if name == prefix or name.startswith(prefix + "."):
            return ldm + name[len(prefix) :]
    per = _layers_per_block(config) + 1
    m = _BLOCK.match(name)
    if m:
        side, b, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if side == "down_blocks":
            if kind == "downsamplers":
                # The downsampler is its own input block after the block's layers.
                tail = "op" + (rest[len("conv") :] if rest and rest.startswith("conv") else f".{rest}" if rest else "")
                return f"input_blocks.{(b + 1) * per}.0.{tail}"
            return f"input_blocks.{1 + b * per + j}.{1 if kind == 'attentions' else 0}{_inner(kind, rest)}"
        if kind == "upsamplers":
            # The upsampler sits inside the block's last output block, after its attention if it has one.
            has_attn = "CrossAttn" in config.up_block_types[b] or "Attn" in config.up_block_types[b]
            return f"output_blocks.{b * per + per - 1}.{2 if has_attn else 1}" + (f".{rest}" if rest else "")
        return f"output_blocks.{b * per + j}.{1 if kind == 'attentions' else 0}{_inner(kind, rest)}"
    m = _MID.match(name)
    if m:
        kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
        idx = 1 if kind == "attentions" else 2 * j
        return f"middle_block.{idx}{_inner(kind, rest)}"
    return None


TE_WRAPPER = "text_model."


def te_spellings(name: str) -> tuple[str, str]:
    """A text-encoder module or tensor name without and with transformers 4's ``text_model.`` level."""
    flat = name.removeprefix(TE_WRAPPER)
    return flat, TE_WRAPPER + flat


def te_path(text_encoder, name: str) -> str:
    """``name`` spelled the way this text encoder names its modules (with or without ``text_model.``)."""
    flat, nested = te_spellings(name)
    return nested if hasattr(text_encoder, "text_model") else flat


def kohya_name(prefix: str, module_path: str) -> str:
    return prefix + module_path.replace(".", "_")


_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def lora_targets(unet, text_encoder) -> dict[str, tuple[str, str]]:
    """Every kohya/SD-webui LoRA name of the model's Linear and Conv2d layers -> (component, module path).

    Both the diffusers-style and the LDM-style U-Net names are in the table.
    Built once per U-Net object (it only depends on module names).
    """
    import torch

    cached = _TABLES.get(unet)
    if cached is not None and cached[0] is text_encoder:
        return cached[1]
    table: dict[str, tuple[str, str]] = {}
    layers = (torch.nn.Linear, torch.nn.Conv2d)
    for name, mod in unet.named_modules():
        if isinstance(mod, layers):
            table[kohya_name("lora_unet_", name)] = ("unet", name)
            try:
                ldm = to_ldm(name, unet.config)
            except ValueError:
                ldm = None
            if ldm:
                table.setdefault(kohya_name("lora_unet_", ldm), ("unet", name))
    for name, mod in text_encoder.named_modules():
        if isinstance(mod, torch.nn.Linear):
            # lora_te1_: the SDXL-style prefix, which diffusers also reads as an SD 1.x file's text encoder.
            for prefix in ("lora_te_", "lora_te1_"):
                for spelling in te_spellings(name):
                    table.setdefault(kohya_name(prefix, spelling), ("text_encoder", name))
    _TABLES[unet] = (text_encoder, table)
    return table


def ldm_unet_state_dict_names(unet) -> dict[str, str]:
    """diffusers parameter name -> LDM parameter name (with ``model.diffusion_model.``), for every U-Net parameter."""
    out = {}
    for pname in unet.state_dict():
        module, _, leaf = pname.rpartition(".")
        ldm = to_ldm(module, unet.config)
        if ldm is None:
            raise ValueError(f"no LDM name for U-Net parameter {pname}")
        out[pname] = f"model.diffusion_model.{ldm}.{leaf}"
    return out
