"""Single-file Stable Diffusion checkpoints (the LDM/CompVis layout), both ways.

SD-webui, ComfyUI, kohya and civitai keep a whole SD 1.x model in one file whose
tensors are named as in the original CompVis code::

    model.diffusion_model.*            the U-Net
    first_stage_model.*                the VAE
    cond_stage_model.transformer.*     the CLIP text encoder (a transformers CLIPTextModel)

``load_single_file`` reads such a file by content (safetensors first; a torch
pickle only through ``weights_only=True``), decides the architecture from the
tensor shapes alone, and builds the diffusers components locally: the configs
come from ``histolab.embedded.architecture`` and the keys are renamed with
diffusers' own converters (``diffusers.loaders.single_file_utils``), so nothing
is fetched from a hub. ``save_single_file`` is the inverse, used to export a
model (e.g. a DreamBooth result) for SD-webui and to build test files from
tiny seeded models.
"""

from __future__ import annotations

import functools
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from histolab.embedded.architecture import ARCHITECTURES, Architecture
from histolab.errors import InvalidRequest, ModelNotFound, UnsafeFile
from histolab.files import load_state_dict, safetensors_header, sha256_file, sniff

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
POSITION_IDS = TEXT_PREFIX + "text_model.embeddings.position_ids"
PREFIXES = (UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX)

# Written into the safetensors metadata so that a file we export loads back as
# exactly the model it was (a single file has no place for a VAE scaling factor
# or a scheduler). Other tools ignore unknown metadata keys.
META_ARCH = "histolab.architecture"
META_SCALING = "histolab.vae_scaling_factor"
META_SCHEDULER = "histolab.scheduler"
# The SD 1.x VAE's latent scaling factor (CompVis v1-inference.yaml: scale_factor).
SD_VAE_SCALING = 0.18215

# ----------------------------------------------------------- diffusers -> LDM
# The inverse of diffusers' convert_ldm_unet_checkpoint / convert_ldm_vae_checkpoint.

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESNET.get(head, head)}.{tail}"


def unet_key_to_ldm(key: str, config: dict[str, Any]) -> str:
    """Name of a diffusers UNet2DConditionModel tensor in the LDM U-Net (without prefix)."""
    n = int(config["layers_per_block"])
    for top, ldm in _UNET_TOP.items():
        if key.startswith(top + "."):
            return ldm + key[len(top) :]
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = 1 + b * (n + 1) + j
        return f"input_blocks.{idx}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{idx}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * (n + 1)}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        idx = b * (n + 1) + j
        return f"output_blocks.{idx}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{idx}.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        b = int(m[1])
        # In an up block with attention the upsampler is the third module of its last layer.
        slot = 2 if "CrossAttn" in config["up_block_types"][b] else 1
        return f"output_blocks.{b * (n + 1) + n}.{slot}.conv.{m[2]}"
    raise InvalidRequest(f"U-Net tensor {key!r} has no place in the SD 1.x single-file layout")


def vae_key_to_ldm(key: str, config: dict[str, Any]) -> str:
    """Name of a diffusers AutoencoderKL tensor in the LDM VAE (without prefix)."""
    n_up = len(config["up_block_types"])
    if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
        return f"{m[1]}.norm_out.{m[2]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    # The LDM decoder numbers its up blocks from the bottom (low resolution last).
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{n_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
        return f"{m[1]}.mid.attn_1.{_VAE_ATTN.get(m[2], m[2])}.{m[3]}"
    if re.fullmatch(r"(encoder|decoder)\.conv_(in|out)\.(weight|bias)|(post_)?quant_conv\.(weight|bias)", key):
        return key
    raise InvalidRequest(f"VAE tensor {key!r} has no place in the SD 1.x single-file layout")


def to_ldm(vae, unet, text_encoder) -> dict[str, Any]:
    """The three networks' tensors under their LDM names (views where possible, no copies)."""
    import torch

    out: dict[str, Any] = {}
    for key, t in unet.state_dict().items():
        out[UNET_PREFIX + unet_key_to_ldm(key, unet.config)] = t
    for key, t in vae.state_dict().items():
        name = VAE_PREFIX + vae_key_to_ldm(key, vae.config)
        # The LDM VAE's attention uses 1x1 convolutions where diffusers uses linear layers.
        if ".mid.attn_1." in name and name.endswith(".weight") and t.ndim == 2:
            t = t[:, :, None, None]
        out[name] = t
    for key, t in text_encoder.state_dict().items():
        inner = key if key.startswith("text_model.") else "text_model." + key
        out[TEXT_PREFIX + inner] = t
    # The CompVis/SD 1.x files carry CLIP's position ids (older transformers kept them
    # in the state dict); SD-webui and ComfyUI accept the file with or without them.
    n_pos = int(text_encoder.config.max_position_embeddings)
    out[POSITION_IDS] = torch.arange(n_pos, dtype=torch.int64)[None]
    return out


def save_single_file(model, path: str | Path, *, dtype=None, title: str | None = None) -> Path:
    """Write a ``BaseModel`` (or anything with vae/unet/text_encoder) as one LDM-layout safetensors file.

    ``dtype``: None keeps the weights' own dtype (bit-exact round trip);
    ``torch.float16`` halves the file, as most SD-webui checkpoints are.
    """
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {}
    for k, t in to_ldm(model.vae, model.unet, model.text_encoder).items():
        t = t.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        tensors[k] = t.contiguous()
    arch = _match(_shapes_of(tensors))
    scheduler = getattr(model, "scheduler_config", None) or (arch.scheduler if arch else {})
    metadata = {
        # SAI model spec fields (as kohya and SD-webui write them) so other tools see what this is.
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v1" if arch and arch.name == "sd15" else "histolab-sd1-small",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": title or path.stem,
        "modelspec.resolution": f"{arch.resolution}x{arch.resolution}" if arch else "",
        "modelspec.prediction_type": scheduler.get("prediction_type", "epsilon"),
        META_SCALING: repr(float(model.vae.config.scaling_factor)),
        META_SCHEDULER: json.dumps(dict(scheduler), sort_keys=True),
    }
    if arch is not None:
        metadata[META_ARCH] = arch.name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# --------------------------------------------------------- architecture by shape


@functools.cache
def expected_shapes(arch_name: str) -> dict[str, tuple[int, ...]]:
    """LDM name -> shape of every tensor of one of our architectures (built on the meta device)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    arch = ARCHITECTURES[arch_name]
    with init_empty_weights():
        vae = AutoencoderKL(**arch.vae)
        unet = UNet2DConditionModel(**arch.unet)
        text_encoder = CLIPTextModel(CLIPTextConfig(**arch.text_encoder))
    return _shapes_of(to_ldm(vae, unet, text_encoder))


def _shapes_of(tensors: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(int(d) for d in v.shape) for k, v in tensors.items() if k.startswith(PREFIXES)}


def normalize_keys(names) -> dict[str, str]:
    """LDM name as found -> canonical LDM name, for the three networks' tensors only.

    Checkpoints saved with transformers < 4.31 (most SD 1.x files of 2022) name the
    text encoder ``cond_stage_model.transformer.embeddings...`` without ``text_model.``.
    """
    out = {}
    for k in names:
        if k.startswith(TEXT_PREFIX):
            inner = k[len(TEXT_PREFIX) :]
            out[k] = TEXT_PREFIX + (inner if inner.startswith("text_model.") else "text_model." + inner)
        elif k.startswith((UNET_PREFIX, VAE_PREFIX)):
            out[k] = k
    return out


def _match(shapes: dict[str, tuple[int, ...]]) -> Architecture | None:
    core = {k: v for k, v in shapes.items() if k != POSITION_IDS}
    for name in ARCHITECTURES:
        want = {k: v for k, v in expected_shapes(name).items() if k != POSITION_IDS}
        if core == want:
            return ARCHITECTURES[name]
    return None


def describe(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """The few dimensions that tell SD variants apart, read from tensor shapes."""
    d: dict[str, Any] = {}
    if s := shapes.get(UNET_PREFIX + "input_blocks.0.0.weight"):
        d["U-Net width"], d["U-Net input channels"] = s[0], s[1]
    for k, s in shapes.items():
        if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight"):
            d["cross-attention width"] = s[1]
            break
    for k, s in shapes.items():
        if k.startswith(UNET_PREFIX) and k.endswith(".proj_in.weight"):
            d["attention projections"] = "linear" if len(s) == 2 else "1x1 conv"
            break
    levels = {int(m[1]) for k in shapes if (m := re.match(re.escape(UNET_PREFIX) + r"input_blocks\.(\d+)\.", k))}
    if levels:
        d["U-Net input blocks"] = max(levels) + 1
    if s := shapes.get(TEXT_PREFIX + "text_model.embeddings.token_embedding.weight"):
        d["text vocabulary"], d["text encoder width"] = s[0], s[1]
    layers = {int(m[1]) for k in shapes if (m := re.match(r".*text_model\.encoder\.layers\.(\d+)\.", k))}
    if layers:
        d["text encoder layers"] = max(layers) + 1
    if s := shapes.get(VAE_PREFIX + "encoder.conv_in.weight"):
        d["VAE width"] = s[0]
    return d


def identify(all_shapes: dict[str, tuple[int, ...]], name: str = "checkpoint") -> Architecture:
    """The architecture whose every tensor name and shape the checkpoint has, or a clear refusal."""
    keys = list(all_shapes)
    family = _family_hint(keys, all_shapes)
    if family and not family.startswith("SD1"):
        raise InvalidRequest(
            f"{name} is {family}; histolab loads Stable Diffusion 1.x-shaped models (SD 1.5 and its fine-tunes, or its own small ones)"
        )
    canon = normalize_keys(keys)
    shapes = {canon[k]: all_shapes[k] for k in canon if canon[k] != POSITION_IDS}
    for prefix, what in ((UNET_PREFIX, "U-Net"), (VAE_PREFIX, "VAE"), (TEXT_PREFIX, "text encoder")):
        if not any(k.startswith(prefix) for k in shapes):
            raise InvalidRequest(
                f"{name} has no {what} ({prefix}* tensors): a complete SD 1.x checkpoint holds the U-Net, "
                "the VAE and the text encoder; SD-webui's 'pruned' files do, U-Net-only files do not"
            )
    if (arch := _match(shapes)) is not None:
        return arch
    # Name the mismatch against the closest architecture we know.
    best = max(ARCHITECTURES, key=lambda a: _overlap(shapes, expected_shapes(a)))
    want = expected_shapes(best)
    mine, theirs = describe(shapes), describe(want)
    dims = [f"{k} {mine.get(k, 'absent')} (theirs {theirs[k]})" for k in theirs if mine.get(k) != theirs[k]]
    missing = sorted(set(want) - set(shapes) - {POSITION_IDS})
    extra = sorted(set(shapes) - set(want))
    wrong = sorted(k for k in set(want) & set(shapes) if want[k] != shapes[k])
    parts = []
    if dims:
        parts.append("; ".join(dims))
    if wrong:
        parts.append(f"{len(wrong)} tensors of another shape, e.g. {wrong[0]} {shapes[wrong[0]]} vs {want[wrong[0]]}")
    if missing:
        parts.append(f"{len(missing)} tensors missing, e.g. {missing[0]}")
    if extra:
        parts.append(f"{len(extra)} unexpected tensors, e.g. {extra[0]}")
    hint = f" It looks like {family}." if family else ""
    raise InvalidRequest(
        f"{name} does not match a supported architecture.{hint} Closest is {best!r}, which differs in: "
        + "; ".join(parts)
        + f". Supported: {', '.join(ARCHITECTURES)} (the SD 1.5 architecture at three sizes)."
    )


def _overlap(shapes, want) -> int:
    return sum(1 for k, v in want.items() if shapes.get(k) == v)


def _family_hint(keys: list[str], shapes: dict[str, tuple[int, ...]]) -> str | None:
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return "an SDXL checkpoint (its text encoders are under conditioner.embedders.*)"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "a Stable Diffusion 2.x checkpoint (an OpenCLIP text encoder under cond_stage_model.model.*)"
    if any(".lora_down." in k or k.startswith(("lora_unet_", "lora_te")) for k in keys):
        return "a LoRA, not a base model (load it as an adapter on a base model)"
    if any(k in ("string_to_param", "emb_params", "clip_l", "clip_g") for k in keys):
        return "a textual-inversion embedding, not a base model (load it as an adapter)"
    if not any(k.startswith(UNET_PREFIX) for k in keys) and any(
        k.startswith(("down_blocks.", "encoder.down_blocks.")) for k in keys
    ):
        return (
            "the weights of one diffusers component (e.g. unet/diffusion_pytorch_model.safetensors), "
            "not a whole model (load the diffusers folder that holds model_index.json)"
        )
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        return "not a Stable Diffusion checkpoint (no model.diffusion_model.* tensors)"
    conv_in = shapes.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in[1] != 4:
        return f"SD1 inpainting or another variant ({conv_in[1]} U-Net input channels, not 4)"
    return None


# ------------------------------------------------------------------- loading


def read_shapes(path: str | Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Tensor shapes and metadata of a safetensors file, from its header alone."""
    header = safetensors_header(path)
    meta = header.pop("__metadata__", None) or {}
    shapes = {}
    for k, info in header.items():
        shape = info.get("shape") if isinstance(info, dict) else None
        if not isinstance(shape, list):
            raise UnsafeFile(f"{Path(path).name}: tensor {k!r} has no shape in the header")
        shapes[k] = tuple(int(d) for d in shape)
    return shapes, {str(k): str(v) for k, v in meta.items()}


def load_single_file(path: str | Path, *, device: str = "cpu", dtype=None):
    """A ``BaseModel`` from a single-file SD 1.x checkpoint, decided by content, built offline."""
    import torch

    from histolab.base_model import assemble

    path = Path(path)
    dtype = dtype or torch.float32
    if not path.is_file():
        raise ModelNotFound(f"no model file at {path}")
    kind = sniff(path)
    if path.suffix.lower() == ".safetensors" and kind != "safetensors":
        # A file that claims the safe format but is not in it was mislabelled or
        # disguised: refuse it rather than fall back to another loader.
        raise UnsafeFile(
            f"{path.name}: named .safetensors but its content is {kind}, not safetensors; refused. "
            "Convert the original checkpoint to safetensors with a trusted tool"
        )
    if kind not in ("safetensors", "torch-zip", "pickle"):
        raise UnsafeFile(
            f"{path.name}: not a model checkpoint (content looks {kind}); "
            "give a .safetensors single file or a diffusers folder"
        )
    # The content hash (the model's id in recipes) is computed beside the loading
    # once the file is known to fit: hashlib releases the GIL, and hashing 2 GB
    # takes seconds on a small CPU.
    with ThreadPoolExecutor(max_workers=1) as pool:
        if kind == "safetensors":
            shapes, meta = read_shapes(path)
            arch = identify(shapes, path.name)  # before reading gigabytes of tensors
            digest = pool.submit(sha256_file, path)
            tensors, _ = load_state_dict(path)
        else:
            tensors, meta = load_state_dict(path)  # weights_only=True: refuses code-carrying pickles
            # CompVis .ckpt files wrap the tensors: {"state_dict": {...}, "global_step": ...}.
            if isinstance(tensors.get("state_dict"), dict):
                tensors = tensors["state_dict"]
            tensors = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
            arch = identify(_shapes_of_all(tensors), path.name)
            digest = pool.submit(sha256_file, path)
        canon = normalize_keys(tensors)
        # Cast here, tensor by tensor, so the networks are built in the asked dtype
        # (a no-op for tensors already in it: the round trip stays bit-exact).
        ckpt = {canon[k]: tensors[k].to(dtype) for k in canon if canon[k] != POSITION_IDS}
        del tensors
        vae, unet, text_encoder = _build(arch, ckpt, _scaling_factor(arch, meta))
        tokenizer = _tokenizer(text_encoder)
        scheduler = _scheduler_config(arch, meta, path.name)
        return assemble(str(path), digest.result(), vae, unet, text_encoder, tokenizer, scheduler, device, dtype)


def _shapes_of_all(tensors) -> dict[str, tuple[int, ...]]:
    return {k: tuple(int(d) for d in v.shape) for k, v in tensors.items()}


def _build(arch: Architecture, ckpt: dict[str, Any], scaling_factor: float):
    """The diffusers networks of ``arch`` holding the checkpoint's tensors (no copy, no random init)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    with init_empty_weights():
        vae = AutoencoderKL(**{**arch.vae, "scaling_factor": scaling_factor})
        unet = UNet2DConditionModel(**arch.unet)
        text_encoder = CLIPTextModel(CLIPTextConfig(**arch.text_encoder))
    unet_sd = convert_ldm_unet_checkpoint(ckpt, dict(unet.config))
    vae_sd = convert_ldm_vae_checkpoint(ckpt, dict(vae.config))
    wrapped = hasattr(text_encoder, "text_model")  # transformers < 5.6 nests CLIPTextModel one level deeper
    te_sd = {}
    for k, v in ckpt.items():
        if k.startswith(TEXT_PREFIX):
            inner = k[len(TEXT_PREFIX) :]
            te_sd[inner if wrapped else inner.removeprefix("text_model.")] = v
    for module, sd, what in ((unet, unet_sd, "U-Net"), (vae, vae_sd, "VAE"), (text_encoder, te_sd, "text encoder")):
        try:
            module.load_state_dict(sd, strict=True, assign=True)
        except RuntimeError as exc:
            raise ModelNotFound(f"the checkpoint's {what} does not fit {arch.name!r}: {str(exc)[:500]}") from exc
    return vae, unet, text_encoder


def _scaling_factor(arch: Architecture, meta: dict[str, str]) -> float:
    if META_SCALING in meta:
        try:
            return float(meta[META_SCALING])
        except ValueError:
            raise UnsafeFile(f"metadata {META_SCALING}={meta[META_SCALING]!r} is not a number") from None
    if arch.name == "embedded":
        # Our embedded VAE has its own measured factor; a file exported without
        # metadata is still most likely that model.
        from histolab.config import EMBEDDED_BASE_DIR

        cfg = EMBEDDED_BASE_DIR / "vae" / "config.json"
        if cfg.exists():
            return float(json.loads(cfg.read_text()).get("scaling_factor", SD_VAE_SCALING))
    return SD_VAE_SCALING


def _scheduler_config(arch: Architecture, meta: dict[str, str], name: str) -> dict[str, Any]:
    if META_SCHEDULER not in meta:
        return dict(arch.scheduler)
    try:
        cfg = json.loads(meta[META_SCHEDULER])
    except json.JSONDecodeError:
        cfg = None
    if not isinstance(cfg, dict):
        raise UnsafeFile(f"{name}: metadata {META_SCHEDULER} is not a JSON object")
    return cfg


def _tokenizer(text_encoder):
    from histolab.clip_tokenizer import tokenizer_for_vocab_size

    return tokenizer_for_vocab_size(int(text_encoder.config.vocab_size))
