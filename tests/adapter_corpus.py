"""A corpus of adapter and checkpoint files in every published spelling for the SD 1.5 family.

Each builder writes one file (or folder) for a given base model, the way the
tool named in its ``writer`` writes it: through the tool's own code where it is
installed here (diffusers' ``save_lora_weights``, peft's ``save_pretrained``,
``torch.save``), and otherwise following the tool's published format key by key
(kohya-ss sd-scripts ``networks/lora.py``, LyCORIS ``modules/loha.py`` /
``lokr.py`` / DoRA ``weight_decompose``, SD-webui ``textual_inversion.py`` and
``hypernetwork.py``, CompVis/SD-webui single files). Weights are seeded random
numbers; builders never read histolab's own writers, so the corpus is an
outside view of the formats.

``CORPUS`` lists every entry with the loader diffusers uses for it (None where
diffusers has no loader for the kind); tests/test_adapters_oracle.py loads each
one in histolab and, where diffusers accepts it, in diffusers, and compares.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

# ------------------------------------------------------------------ names


def te_name_t4(name: str) -> str:
    """A text-encoder module name as transformers 4 spells it (``text_model.encoder.layers.0...``).

    transformers 5 flattened CLIPTextModel (no ``text_model`` level); every LoRA made before it, which is
    nearly every file in the wild, names the layers with the prefix.
    """
    return name if name.startswith("text_model.") else "text_model." + name


def te_name_t5(name: str) -> str:
    return name.removeprefix("text_model.")


def unet_layers(model, which: Callable[[str, torch.nn.Module], bool]):
    return [
        (n, m)
        for n, m in model.unet.named_modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and which(n, m)
    ]


def te_layers(model):
    return [(n, m) for n, m in model.text_encoder.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]


def attention(name, mod) -> bool:
    return "attentions" in name


def convs(name, mod) -> bool:
    """LoCon targets: every ResNet convolution (3x3 conv1/conv2, 1x1 shortcut) and the samplers' convolutions."""
    return isinstance(mod, torch.nn.Conv2d) and ("resnets" in name or "samplers" in name)


def to_ldm_name(name: str, config) -> str:
    """A U-Net module's LDM (CompVis) name, derived here from the published block layout, not histolab's table.

    SD 1.x: input_blocks.0 is conv_in; each down block has ``layers_per_block`` (resnet, attention) input blocks
    and then its downsampler; output blocks have ``layers_per_block + 1`` each, the upsampler last.
    """
    lpb = config.layers_per_block
    per_down, per_up = lpb + 1, lpb + 1
    resnet = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1"}
    resnet["conv_shortcut"] = "skip_connection"
    p = name.split(".")
    if p[0] == "down_blocks":
        b, kind, j, rest = int(p[1]), p[2], int(p[3]), p[4:]
        if kind == "downsamplers":
            return f"input_blocks.{(b + 1) * per_down}.0.op"
        idx = 1 + b * per_down + j
        if kind == "resnets":
            return f"input_blocks.{idx}.0.{resnet[rest[0]]}"
        return f"input_blocks.{idx}.1." + ".".join(rest)
    if p[0] == "up_blocks":
        b, kind, j, rest = int(p[1]), p[2], int(p[3]), p[4:]
        if kind == "upsamplers":
            has_attn = "Attn" in config.up_block_types[b]
            return f"output_blocks.{b * per_up + per_up - 1}.{2 if has_attn else 1}.conv"
        idx = b * per_up + j
        if kind == "resnets":
            return f"output_blocks.{idx}.0.{resnet[rest[0]]}"
        return f"output_blocks.{idx}.1." + ".".join(rest)
    if p[0] == "mid_block":
        kind, j, rest = p[1], int(p[2]), p[3:]
        if kind == "attentions":
            return "middle_block.1." + ".".join(rest)
        return f"middle_block.{2 * j}.{resnet[rest[0]]}"
    raise ValueError(f"no LDM name for {name}")


def kohya(prefix: str, path: str) -> str:
    return prefix + path.replace(".", "_")


def _shape(mod):
    if isinstance(mod, torch.nn.Conv2d):
        return mod.out_channels, mod.in_channels, tuple(mod.kernel_size)
    return mod.out_features, mod.in_features, ()


def _save(path: Path, tensors: dict, metadata: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


# ------------------------------------------------------------------ kohya / SD-webui LoRA


def kohya_state(
    model,
    *,
    seed: int,
    unet=attention,
    te: str | None = "t4",
    ldm: bool = False,
    rank: int = 4,
    scale: float = 0.2,
    dtype=torch.float32,
    alpha: float = 2.0,
    conv_alpha: float = 1.0,
    per_module: bool = False,
) -> dict[str, torch.Tensor]:
    """kohya sd-scripts ``networks/lora.py`` LoRANetwork.state_dict(): ``<lora_name>.lora_down.weight``
    (rank, in[, kh, kw]), ``.lora_up.weight`` (out, rank[, 1, 1]) and ``.alpha`` (a 0-d tensor): ``network_alpha``
    on linear and 1x1 layers, ``conv_alpha`` on 3x3 convolutions (both != rank).

    ``per_module``: rank and alpha differ from module to module, as sd-scripts' ``resize_lora.py
    --dynamic_method`` writes them (rank 2..4, alpha 1..4 cycling)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    i = 0

    def add(key, mod):
        nonlocal i
        out, inp, k = _shape(mod)
        r = 2 + i % 3 if per_module else rank
        sd[f"{key}.lora_down.weight"] = (torch.randn(r, inp, *k, generator=g) * scale).to(dtype)
        sd[f"{key}.lora_up.weight"] = (torch.randn(out, r, *((1, 1) if k else ()), generator=g) * scale).to(dtype)
        a = float(1 + i % 4) if per_module else conv_alpha if k and k != (1, 1) else alpha
        sd[f"{key}.alpha"] = torch.tensor(a, dtype=dtype)
        i += 1

    for name, mod in unet_layers(model, unet):
        add(kohya("lora_unet_", to_ldm_name(name, model.unet.config) if ldm else name), mod)
    if te:
        spell = te_name_t5 if te == "t5" else te_name_t4
        prefix = "lora_te1_" if te == "te1" else "lora_te_"
        for name, mod in te_layers(model):
            add(kohya(prefix, spell(name)), mod)
    return sd


# ------------------------------------------------------------------ LyCORIS


def loha_state(
    model, *, seed: int, unet=attention, te: bool = True, rank: int = 4, alpha: float = 2.0, tucker: bool = False
):
    """LyCORIS LoHa (``modules/loha.py``): ``hada_w1_a`` (out, r), ``hada_w1_b`` (r, in*kh*kw), the same for w2,
    and ``alpha``; dW = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r, reshaped to the layer's weight."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    mods = [(kohya("lora_unet_", n), m) for n, m in unet_layers(model, unet)]
    if te:
        mods += [(kohya("lora_te_", te_name_t4(n)), m) for n, m in te_layers(model)]
    for key, mod in mods:
        out, inp, k = _shape(mod)
        flat = inp * (k[0] * k[1] if k else 1)
        for w in ("w1", "w2"):
            if tucker and k and k != (1, 1):
                # use_tucker on a kxk convolution: w_a (r, out), w_b (r, in) and a core t (r, r, kh, kw)
                sd[f"{key}.hada_{w}_a"] = torch.randn(rank, out, generator=g) * 0.3
                sd[f"{key}.hada_{w}_b"] = torch.randn(rank, inp, generator=g) * 0.3
                sd[f"{key}.hada_t{w[1]}"] = torch.randn(rank, rank, *k, generator=g) * 0.3
                continue
            sd[f"{key}.hada_{w}_a"] = torch.randn(out, rank, generator=g) * 0.3
            sd[f"{key}.hada_{w}_b"] = torch.randn(rank, flat, generator=g) * 0.3
        sd[f"{key}.alpha"] = torch.tensor(alpha)
    return sd


def _factor(n: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS ``factorization(dimension, factor)``: m <= n with m * n = dimension, m as close to sqrt as allowed."""
    if factor > 0 and n % factor == 0:
        m, k = factor, n // factor
        return (m, k) if m <= k else (k, m)
    if factor < 0:
        factor = n
    m, length = 1, n
    k = n
    while m < k:
        new_m = m + 1
        while n % new_m != 0:
            new_m += 1
        new_k = n // new_m
        if new_m + new_k > length or new_m > factor:
            break
        m, k, length = new_m, new_k, new_m + new_k
    return (m, k) if m <= k else (k, m)


def lokr_state(
    model, *, seed: int, unet=attention, te: bool = True, rank: int = 2, alpha: float = 1.0, tucker: bool = False
):
    """LyCORIS LoKr (``modules/lokr.py``): dW = kron(w1, w2) * scale, w1 = ``lokr_w1`` (full, small) and
    w2 = ``lokr_w2_a @ lokr_w2_b`` (low rank) or ``lokr_w2`` (full); scale = alpha / r when a factor is
    decomposed, else 1. Every other layer here uses the full w2 form, so both are in the file."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    mods = [(kohya("lora_unet_", n), m) for n, m in unet_layers(model, unet)]
    if te:
        mods += [(kohya("lora_te_", te_name_t4(n)), m) for n, m in te_layers(model)]
    for i, (key, mod) in enumerate(mods):
        out, inp, k = _shape(mod)
        out_l, out_k = _factor(out, 4)
        in_m, in_n = _factor(inp, 4)
        sd[f"{key}.lokr_w1"] = torch.randn(out_l, in_m, generator=g) * 0.3
        if tucker and k and k != (1, 1):
            # use_tucker: w2 = einsum(t2, w2_a (r, out_k), w2_b (r, in_n)) with the kernel in the core
            sd[f"{key}.lokr_w2_a"] = torch.randn(rank, out_k, generator=g) * 0.3
            sd[f"{key}.lokr_w2_b"] = torch.randn(rank, in_n, generator=g) * 0.3
            sd[f"{key}.lokr_t2"] = torch.randn(rank, rank, *k, generator=g) * 0.3
        elif i % 2 or k:
            # conv layers store w2 whole, with the kernel: (out_k, in_n, kh, kw)
            sd[f"{key}.lokr_w2"] = torch.randn(out_k, in_n, *k, generator=g) * 0.3
        else:
            sd[f"{key}.lokr_w2_a"] = torch.randn(out_k, rank, generator=g) * 0.3
            sd[f"{key}.lokr_w2_b"] = torch.randn(rank, in_n, generator=g) * 0.3
        sd[f"{key}.alpha"] = torch.tensor(alpha)
    return sd


def locon_tucker_state(model, *, seed: int, rank: int = 4, alpha: float = 2.0):
    """LyCORIS LoCon with use_tucker on kxk convolutions: ``lora_down`` (r, in, 1, 1), ``lora_mid`` (r, r, kh, kw),
    ``lora_up`` (out, r, 1, 1); 1x1 convolutions keep the plain pair."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, mod in unet_layers(model, convs):
        key = kohya("lora_unet_", name)
        out, inp, k = _shape(mod)
        if k != (1, 1):
            sd[f"{key}.lora_down.weight"] = torch.randn(rank, inp, 1, 1, generator=g) * 0.3
            sd[f"{key}.lora_mid.weight"] = torch.randn(rank, rank, *k, generator=g) * 0.3
        else:
            sd[f"{key}.lora_down.weight"] = torch.randn(rank, inp, 1, 1, generator=g) * 0.3
        sd[f"{key}.lora_up.weight"] = torch.randn(out, rank, 1, 1, generator=g) * 0.3
        sd[f"{key}.alpha"] = torch.tensor(alpha)
    return sd


def dora_kohya_state(model, *, seed: int, unet=attention):
    """LyCORIS LoRA with ``weight_decompose`` (DoRA) in kohya names: ``dora_scale`` is the magnitude vector.

    LyCORIS stores it per output row, shape (out, 1) ("wd_on_out"), the layout diffusers converts to peft's
    ``lora_magnitude_vector``: W' = m * (W + dW) / ||W + dW|| per output row."""
    sd = kohya_state(model, seed=seed, unet=unet, te="t4")
    g = torch.Generator().manual_seed(seed + 1)
    for key in [k for k in sd if k.endswith(".lora_up.weight")]:
        up = sd[key]
        m = 1.0 + 0.1 * torch.rand(up.shape[0], *([1] * (up.ndim - 1)), generator=g)
        sd[key.replace(".lora_up.weight", ".dora_scale")] = m
    return sd


# ------------------------------------------------------------------ diffusers / peft (their own code)


UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # train_text_to_image_lora.py / train_dreambooth_lora.py's
# The same with the ResNet convolutions and projections too: the saved file then mixes lora_A keys (convolutions,
# which convert_state_dict_to_diffusers leaves as they are) with lora.down keys (linear layers).
UNET_TARGETS_CONV = [*UNET_TARGETS, "proj_in", "proj_out", "ff.net.0.proj", "conv1", "conv2"]


def _peft_copies(model, *, seed, rank, alpha, dora=False, te=True, targets=UNET_TARGETS):
    """Copies of the networks with peft LoRA layers (random A and B, seeded): the same weights for the same seed."""
    from peft import LoraConfig

    torch.manual_seed(seed)
    unet = copy.deepcopy(model.unet)
    cfg = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        init_lora_weights=False,  # random A and B: a zero B would make every comparison trivially equal
        target_modules=list(targets),
        use_dora=dora,
    )
    unet.add_adapter(cfg)
    text = None
    if te:
        text = copy.deepcopy(model.text_encoder)
        te_cfg = LoraConfig(
            r=rank,
            lora_alpha=alpha * 2,
            init_lora_weights=False,
            target_modules=["q_proj", "k_proj", "v_proj", "out_proj"],
            use_dora=dora,
        )
        text.add_adapter(te_cfg)
    return unet, cfg, text, (te_cfg if te else None)


def diffusers_saved(
    model, folder: Path, *, seed: int, rank: int = 4, alpha: float = 8.0, dora: bool = False, targets=UNET_TARGETS
) -> Path:
    """What diffusers' train_text_to_image_lora.py / train_dreambooth_lora.py save: peft layers collected with
    ``get_peft_model_state_dict`` and written by ``StableDiffusionPipeline.save_lora_weights`` (with the
    LoraConfig as ``lora_adapter_metadata``, since lora_alpha != r)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    unet, cfg, text, te_cfg = _peft_copies(model, seed=seed, rank=rank, alpha=alpha, dora=dora, targets=targets)
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(text)),
        unet_lora_adapter_metadata=cfg.to_dict(),
        text_encoder_lora_adapter_metadata=te_cfg.to_dict(),
        safe_serialization=True,
    )
    return folder / "pytorch_lora_weights.safetensors"


def diffusers_saved_t4(model, folder: Path, *, seed: int) -> Path:
    """The same file as diffusers wrote it with transformers 4 (``text_encoder.text_model.encoder...`` keys)."""
    from safetensors import safe_open

    src = diffusers_saved(model, folder / "t5", seed=seed)
    with safe_open(str(src), "pt") as fh:
        meta = fh.metadata()
        sd = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    renamed = {
        ("text_encoder." + te_name_t4(k.removeprefix("text_encoder.")) if k.startswith("text_encoder.") else k): v
        for k, v in sd.items()
    }
    return _save(folder / "pytorch_lora_weights.safetensors", renamed, meta)


def peft_folder(model, folder: Path, *, seed: int, rank: int = 4, alpha: float = 2.0, component="unet") -> Path:
    """peft's own adapter folder: ``get_peft_model(network, cfg).save_pretrained`` writes adapter_model.safetensors
    (``base_model.model.<module>.lora_A.weight``, no component name) and adapter_config.json (r, lora_alpha and
    patterns; here rsLoRA for the text encoder)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    network = copy.deepcopy(getattr(model, component))
    if component == "unet":
        cfg = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            init_lora_weights=False,
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
            rank_pattern={"attn2.to_k": 2},
            alpha_pattern={"attn2.to_v": 6.0},
        )
    else:
        cfg = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            init_lora_weights=False,
            target_modules=["q_proj", "v_proj", "fc1"],
            use_rslora=True,
        )
    peft_model = get_peft_model(network, cfg)
    peft_model.save_pretrained(str(folder))
    return folder


# ------------------------------------------------------------------ textual inversion


def ti_vectors(model, n: int, seed: int):
    width = model.text_encoder.get_input_embeddings().embedding_dim
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def ti_diffusers(model, folder: Path, *, seed: int, n: int = 1, bin: bool = False, token: str = "<glands>"):
    """diffusers' textual_inversion.py ``save_progress``: {placeholder_token: embeddings (n, width)}."""
    sd = {token: ti_vectors(model, n, seed)}
    folder.mkdir(parents=True, exist_ok=True)
    if bin:
        torch.save(sd, folder / "learned_embeds.bin")
        return folder / "learned_embeds.bin"
    return _save(folder / "learned_embeds.safetensors", sd, {"format": "pt"})


def ti_sdwebui_pt(model, path: Path, *, seed: int, n: int):
    """SD-webui Embedding.save: plain dicts and tensors, torch.save (loaded back with weights_only=True)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": ti_vectors(model, n, seed)},
            "name": path.stem,
            "step": 3000,
            "sd_checkpoint": "cc6cb27103",
            "sd_checkpoint_name": "v1-5-pruned-emaonly",
        },
        path,
    )
    return path


def ti_sdwebui_safetensors(model, path: Path, *, seed: int, n: int):
    """SD-webui's safetensors embedding: {"emb_params": (n, width)}."""
    return _save(path, {"emb_params": ti_vectors(model, n, seed)})


# ------------------------------------------------------------------ hypernetworks


ACT = {"relu": torch.nn.ReLU, "leakyrelu": torch.nn.LeakyReLU, "swish": torch.nn.Hardswish, "tanh": torch.nn.Tanh}
ACT |= {"linear": None, "elu": torch.nn.ELU, "sigmoid": torch.nn.Sigmoid, "mish": torch.nn.Mish}


def sdwebui_hypernetwork_layers(width, structure, activation, layer_norm, dropout, activate_output):
    """SD-webui HypernetworkModule.__init__'s nn.Sequential, as (kind, in, out) tuples (for the state-dict keys)."""
    layers = []
    for i in range(len(structure) - 1):
        a, b = int(width * structure[i]), int(width * structure[i + 1])
        layers.append(("linear", a, b))
        if activation != "linear" and (i < len(structure) - 2 or activate_output):
            layers.append(("act", 0, 0))
        if layer_norm:
            layers.append(("norm", b, b))
        if dropout[i + 1] > 0:
            layers.append(("dropout", 0, 0))
    return layers


def hypernetwork_pt(
    path: Path,
    widths,
    *,
    seed: int,
    structure=(1, 2, 1),
    activation="relu",
    layer_norm=False,
    use_dropout=False,
    last_layer_dropout=False,
    activate_output=False,
):
    """SD-webui Hypernetwork.save(): {width: (k_state, v_state), options...}; layer keys ``linear.<i>.*``."""
    structure = list(structure)
    drop = [0.0] * len(structure)
    if use_dropout:
        drop = [0.0] + [0.3] * (len(structure) - 3) + [0.3 if last_layer_dropout else 0.0, 0.0]
    layers = sdwebui_hypernetwork_layers(1, structure, activation, layer_norm, drop, activate_output)
    g = torch.Generator().manual_seed(seed)
    obj = {}
    for w in widths:
        pair = []
        for _ in "kv":
            sd = {}
            for idx, (kind, _a, _b) in enumerate(layers):
                if kind == "linear":
                    i = sum(1 for x in layers[:idx] if x[0] == "linear")
                    a, b = int(w * structure[i]), int(w * structure[i + 1])
                    sd[f"linear.{idx}.weight"] = torch.randn(b, a, generator=g) * 0.1
                    sd[f"linear.{idx}.bias"] = torch.randn(b, generator=g) * 0.1
                elif kind == "norm":
                    i = sum(1 for x in layers[:idx] if x[0] == "linear") - 1
                    b = int(w * structure[i + 1])
                    sd[f"linear.{idx}.weight"] = 1 + torch.randn(b, generator=g) * 0.1
                    sd[f"linear.{idx}.bias"] = torch.randn(b, generator=g) * 0.1
            pair.append(sd)
        obj[w] = tuple(pair)
    obj.update(
        {
            "step": 1200,
            "name": path.stem,
            "layer_structure": structure,
            "activation_func": activation,
            "is_layer_norm": layer_norm,
            "weight_initialization": "Normal",
            "sd_checkpoint": "cc6cb27103",
            "sd_checkpoint_name": "v1-5-pruned-emaonly",
            "activate_output": activate_output,
            "use_dropout": use_dropout,
            "dropout_structure": drop,
            "last_layer_dropout": last_layer_dropout,
            "optional_info": None,
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


# ------------------------------------------------------------------ single files


def ldm_checkpoint(model, *, ema: bool, dtype=torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    """A full SD 1.x checkpoint in the CompVis layout, made with diffusers' published mapping read backwards
    (its convert_ldm_* converters are the reference the oracle test loads it with).

    ``ema``: also ``model_ema.<name without dots>`` copies of the U-Net (different values: EMA weights
    differ from the trained ones), as CompVis training writes them.
    """
    from histolab.single_file import to_ldm

    sd = {k: v.detach().clone().to(dtype) for k, v in to_ldm(model.vae, model.unet, model.text_encoder).items()}
    if ema:
        g = torch.Generator().manual_seed(seed)
        for k in [k for k in sd if k.startswith("model.diffusion_model.")]:
            flat = "model_ema." + k.removeprefix("model.").replace(".", "")
            sd[flat] = (sd[k].float() + 0.01 * torch.randn(sd[k].shape, generator=g)).to(dtype)
        sd["model_ema.decay"] = torch.tensor(0.9999)
        sd["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    return sd


def single_file(model, path: Path, *, ema: bool, fp16: bool, ckpt: bool) -> Path:
    dtype = torch.float16 if fp16 else torch.float32
    sd = ldm_checkpoint(model, ema=ema, dtype=dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    if ckpt:
        torch.save({"state_dict": sd, "global_step": 470000, "epoch": 6}, path)
        return path
    return _save(path, sd)


# ------------------------------------------------------------------ the corpus


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str  # "lora", "textual_inversion", "hypernetwork", "checkpoint"
    writer: str  # whose format, and how it was made
    diffusers: str | None  # "lora", "ti", "single_file", "peft": the loader that reads it in diffusers/peft
    build: Callable  # (model, tmp folder) -> path to hand to histolab
    token: str | None = None  # textual inversion: the token both sides use
    # The same tensors under the names diffusers reads, for files whose spelling diffusers refuses.
    twin: Callable | None = None


def _lora(state_fn, **kw):
    def build(model, folder: Path):
        return _save(folder / "lora.safetensors", state_fn(model, **kw), {"ss_network_module": "networks.lora"})

    return build


def _everything(name, mod):
    return True


CORPUS: list[Entry] = [
    Entry(
        "kohya-unet-te-diffusers-names",
        "lora",
        "kohya sd-scripts: lora_unet_down_blocks_1_attentions_0_... + lora_te_text_model_encoder_layers_0_..., alpha",
        "lora",
        _lora(kohya_state, seed=1),
    ),
    Entry(
        "kohya-per-module-rank-alpha",
        "lora",
        "sd-scripts resize_lora.py --dynamic_method output: rank and alpha differ per module",
        "lora",
        _lora(kohya_state, seed=26, unet=lambda n, m: attention(n, m) or convs(n, m), per_module=True),
    ),
    Entry(
        "kohya-unet-te-fp16",
        "lora",
        "kohya sd-scripts saved with --save_precision fp16",
        "lora",
        _lora(kohya_state, seed=2, dtype=torch.float16),
    ),
    Entry(
        "kohya-te-transformers5-names",
        "lora",
        "kohya-style keys written from a transformers-5 CLIPTextModel (lora_te_encoder_layers_0_...)",
        "lora",
        _lora(kohya_state, seed=3, te="t5"),
    ),
    Entry(
        "kohya-te1-prefix",
        "lora",
        "kohya-style file whose text-encoder keys use SDXL's lora_te1_ prefix (diffusers reads it as the text encoder)",
        "lora",
        _lora(kohya_state, seed=27, te="te1"),
    ),
    Entry(
        "kohya-ldm-names",
        "lora",
        "kohya/SD-webui LDM (CompVis) block names: lora_unet_input_blocks_4_1_..., middle_block, output_blocks",
        "lora",
        _lora(kohya_state, seed=4, ldm=True),
        twin=_lora(kohya_state, seed=4),
    ),
    Entry(
        "kohya-locon-resnets",
        "lora",
        "LoCon (LyCORIS / kohya conv_dim): conv LoRA on ResNet and sampler convolutions, attention too",
        "lora",
        _lora(kohya_state, seed=5, unet=lambda n, m: attention(n, m) or convs(n, m)),
    ),
    Entry(
        "kohya-locon-ldm-names",
        "lora",
        "LoCon in LDM names (in_layers_2, out_layers_3, skip_connection, op)",
        "lora",
        _lora(kohya_state, seed=6, unet=convs, ldm=True, te=None),
        twin=_lora(kohya_state, seed=6, unet=convs, te=None),
    ),
    Entry(
        "kohya-text-encoder-only",
        "lora",
        "kohya --network_train_text_encoder_only",
        "lora",
        _lora(kohya_state, seed=7, unet=lambda n, m: False),
    ),
    Entry(
        "lycoris-loha",
        "lora",
        "LyCORIS LoHa (hada_w1_a/b, hada_w2_a/b, alpha), U-Net attention + text encoder",
        "lora",
        _lora(loha_state, seed=8),
    ),
    Entry(
        "lycoris-loha-conv",
        "lora",
        "LyCORIS LoHa on ResNet convolutions",
        "lora",
        _lora(loha_state, seed=9, unet=convs, te=False),
    ),
    Entry(
        "lycoris-lokr",
        "lora",
        "LyCORIS LoKr (lokr_w1 + lokr_w2_a/b or lokr_w2, alpha), U-Net attention + text encoder",
        "lora",
        _lora(lokr_state, seed=10),
    ),
    Entry(
        "lycoris-lokr-conv",
        "lora",
        "LyCORIS LoKr on ResNet convolutions (w2 with the kernel)",
        "lora",
        _lora(lokr_state, seed=11, unet=convs, te=False),
    ),
    Entry(
        "lycoris-loha-tucker",
        "lora",
        "LyCORIS LoHa with use_tucker on ResNet convolutions (hada_t1, hada_t2)",
        "lora",
        _lora(loha_state, seed=28, unet=convs, te=False, tucker=True),
    ),
    Entry(
        "lycoris-lokr-tucker",
        "lora",
        "LyCORIS LoKr with use_tucker on ResNet convolutions (lokr_t2)",
        "lora",
        _lora(lokr_state, seed=29, unet=convs, te=False, tucker=True),
    ),
    Entry(
        "lycoris-locon-tucker",
        "lora",
        "LyCORIS LoCon with use_tucker on ResNet convolutions (lora_mid)",
        "lora",
        _lora(locon_tucker_state, seed=30),
    ),
    Entry(
        "lycoris-dora-kohya",
        "lora",
        "LyCORIS LoRA with weight_decompose (dora_scale, per output row)",
        "lora",
        _lora(dora_kohya_state, seed=12),
    ),
    Entry(
        "diffusers-save-lora-weights",
        "lora",
        "diffusers StableDiffusionPipeline.save_lora_weights of peft layers (transformers 5 text encoder)",
        "lora",
        lambda m, d: diffusers_saved(m, d, seed=13),
    ),
    Entry(
        "diffusers-save-lora-weights-t4",
        "lora",
        "the same with transformers 4's text_encoder.text_model.encoder... keys",
        "lora",
        lambda m, d: diffusers_saved_t4(m, d, seed=14),
    ),
    Entry(
        "diffusers-dora",
        "lora",
        "diffusers save_lora_weights of peft DoRA layers (lora_magnitude_vector)",
        "lora",
        lambda m, d: diffusers_saved(m, d, seed=15, dora=True),
    ),
    Entry(
        "diffusers-save-lora-weights-convs",
        "lora",
        "diffusers save_lora_weights of peft layers on attention, projections, feed-forward and ResNet convolutions",
        "peft-model",  # diffusers drops its linear layers (see UNET_TARGETS_CONV): peft's merged model is the oracle
        lambda m, d: diffusers_saved(m, d, seed=17, targets=UNET_TARGETS_CONV),
    ),
    Entry(
        "peft-adapter-folder-text-encoder",
        "lora",
        "peft save_pretrained of a CLIPTextModel LoraConfig with use_rslora (keys without a component)",
        "peft",
        lambda m, d: peft_folder(m, d / "peft-te", seed=18, component="text_encoder"),
    ),
    Entry(
        "peft-adapter-folder",
        "lora",
        "peft save_pretrained of a U-Net LoraConfig (adapter_config.json with rank/alpha patterns)",
        "peft",
        lambda m, d: peft_folder(m, d / "peft", seed=16),
    ),
    Entry(
        "ti-diffusers-safetensors",
        "textual_inversion",
        "diffusers learned_embeds.safetensors {token: (1, width)}",
        "ti",
        lambda m, d: ti_diffusers(m, d / "ti", seed=20),
        "<glands>",
    ),
    Entry(
        "ti-diffusers-bin-multi",
        "textual_inversion",
        "diffusers learned_embeds.bin (torch.save) {token: (3, width)}",
        "ti",
        lambda m, d: ti_diffusers(m, d / "ti", seed=21, n=3, bin=True),
        "<glands>",
    ),
    Entry(
        "ti-sdwebui-pt-one",
        "textual_inversion",
        "SD-webui .pt, string_to_param, one vector",
        "ti",
        lambda m, d: ti_sdwebui_pt(m, d / "cryptemb.pt", seed=22, n=1),
        "cryptemb",
    ),
    Entry(
        "ti-sdwebui-pt-several",
        "textual_inversion",
        "SD-webui .pt, string_to_param, four vectors",
        "ti",
        lambda m, d: ti_sdwebui_pt(m, d / "glandemb.pt", seed=23, n=4),
        "glandemb",
    ),
    Entry(
        "ti-sdwebui-safetensors-one",
        "textual_inversion",
        "SD-webui .safetensors, emb_params, one vector",
        "ti",
        lambda m, d: ti_sdwebui_safetensors(m, d / "stromaemb.safetensors", seed=24, n=1),
        "stromaemb",
    ),
    Entry(
        "ti-sdwebui-safetensors-several",
        "textual_inversion",
        "SD-webui .safetensors, emb_params, two vectors",
        "ti",
        lambda m, d: ti_sdwebui_safetensors(m, d / "mucinemb.safetensors", seed=25, n=2),
        "mucinemb",
    ),
]

HYPERNETWORKS = {
    "hn-relu-121": dict(structure=(1, 2, 1), activation="relu"),
    "hn-linear-11": dict(structure=(1, 1), activation="linear"),
    "hn-leakyrelu-1221-layernorm": dict(structure=(1, 2, 2, 1), activation="leakyrelu", layer_norm=True),
    "hn-swish-dropout": dict(structure=(1, 2, 2, 1), activation="swish", use_dropout=True, last_layer_dropout=True),
    "hn-tanh-activate-output": dict(structure=(1, 1.5, 1), activation="tanh", activate_output=True),
    "hn-mish-layernorm-dropout": dict(structure=(1, 2, 1), activation="mish", layer_norm=True, use_dropout=True),
}
for _name, _opts in HYPERNETWORKS.items():
    CORPUS.append(
        Entry(
            _name,
            "hypernetwork",
            f"SD-webui hypernetwork .pt, {_opts}",
            None,
            lambda m, d, _n=_name, _o=_opts: hypernetwork_pt(
                d / f"{_n}.pt", sorted({m.cross_attention_dim, *m.unet.config.block_out_channels}), seed=30, **_o
            ),
        )
    )

for _ema in (False, True):
    for _fp16 in (False, True):
        for _ckpt in (False, True):
            _n = f"single-file-{'fp16' if _fp16 else 'fp32'}{'-ema' if _ema else ''}.{'ckpt' if _ckpt else 'safetensors'}"
            CORPUS.append(
                Entry(
                    _n,
                    "checkpoint",
                    "CompVis/SD-webui single file (model.diffusion_model., first_stage_model., cond_stage_model.)"
                    + (", with model_ema.* keys" if _ema else ""),
                    "single_file",
                    lambda m, d, _e=_ema, _f=_fp16, _c=_ckpt, _n=_n: single_file(m, d / _n, ema=_e, fp16=_f, ckpt=_c),
                )
            )

BY_NAME = {e.name: e for e in CORPUS}
