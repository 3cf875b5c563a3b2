"""LoRA and its relatives: updates ``W + strength * (alpha / rank) * up @ down`` on Linear and Conv2d layers.

Files read, decided by their keys (never by their names):

* diffusers / peft: ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (peft),
  ``unet.<module>.lora.down.weight`` / ``lora.up.weight`` (diffusers 0.17-0.20 and what
  ``save_lora_weights`` writes), ``...lora_linear_layer.down.weight`` (old text-encoder LoRA),
  ``...attn1.processor.to_q_lora.down.weight`` (attention-processor LoRA), ``...lora_magnitude_vector``
  (DoRA); a peft folder's ``base_model.model.<module>...`` keys. alpha from ``<module>.alpha`` keys, the
  ``lora_adapter_metadata`` header or adapter_config.json (with peft's alpha_pattern), else alpha = rank;
* kohya-ss sd-scripts, SD-webui and LyCORIS: ``lora_unet_* / lora_te_*`` with ``.lora_down.weight``,
  ``.lora_up.weight`` and ``.alpha``, in diffusers-style (``down_blocks_1_attentions_0``) or LDM-style
  (``input_blocks_4_1``) names, including conv LoRA (LoCon), LoHa (``.hada_*``), LoKr (``.lokr_*``)
  and DoRA (``.dora_scale``): see ``histolab.adapters.lycoris`` for their maths.

Text-encoder layers are found in both spellings (transformers 4's ``text_model.encoder...`` and
transformers 5's ``encoder...``). Layers naming modules the base does not have are left out and
listed in ``load_report``, as diffusers/peft leave them out; a file none of whose layers fit is an error.

Applying adds one forward hook per layer, which adds the update to the layer's output (two low-rank
products, or the full update for LoHa, LoKr and DoRA); base weights are never written, so removing
the hooks restores the model exactly and several LoRAs combine by simply stacking.
"""

from __future__ import annotations

import json
import re
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from histolab.adapters import lycoris
from histolab.adapters.edit import ModelEdit
from histolab.adapters.kohya import lora_targets, te_path
from histolab.adapters.lycoris import CP_KEYS, LOHA_KEYS, LOKR_KEYS
from histolab.adapters.report import LoadReport
from histolab.errors import AdapterError

WEIGHTS_NAME = "adapter.safetensors"
COMPONENTS = ("unet", "text_encoder")

# Other formats: named so the error says what the file is.
_UNSUPPORTED = {
    ".lokr_t1": "LoKr with a Tucker-decomposed first factor (not written by LyCORIS)",
    ".on_input": "IA3 (LyCORIS)",
    ".oft_": "OFT",
}
KIND_NAMES = {"lora": "LoRA", "lora_cp": "LoCon (Tucker)", "loha": "LoHa", "lokr": "LoKr"}
FORMAT_NAMES = {
    "peft": "peft / diffusers LoRA (lora_A/lora_B)",
    "diffusers": "diffusers LoRA (lora.down/lora.up)",
    "kohya": "kohya / SD-webui network (diffusers block names)",
    "kohya-ldm": "kohya / SD-webui network (LDM block names)",
}


def _unsupported(key: str) -> str | None:
    if key.endswith((".diff", ".diff_b")):
        return "a full-weight difference (LyCORIS 'full')"
    return next((what for marker, what in _UNSUPPORTED.items() if marker in key), None)


_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")
_KOHYA_PARTS = ("lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "dora_scale", *LOHA_KEYS, *LOKR_KEYS)
_PEFT_AB = re.compile(r"^(?P<mod>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")
_DIFFUSERS_DU = re.compile(r"^(?P<mod>.+)\.(?:lora|lora_linear_layer)\.(?P<du>down|up)\.weight$")
_ATTN_PROC = re.compile(
    r"^(?P<mod>.+?)(?:\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<du>down|up)\.weight$"
)
_MAGNITUDE = re.compile(r"^(?P<mod>.+)\.lora_magnitude_vector(?:\.default(?:_\d+)?)?(?:\.weight)?$")
_ALPHA = re.compile(r"^(?P<mod>.+)\.alpha$")


@dataclass
class LoraLayer:
    """One layer's update as read from a file; ``target`` is resolved against a model later."""

    key: str  # the layer's name in the file, for messages
    down: Any  # LoRA: (rank, in) or (rank, in, kh, kw); None for LoHa / LoKr
    up: Any  # LoRA: (out, rank) or (out, rank, 1, 1)
    alpha: float | None  # None: alpha = rank (scale 1)
    # (component or None, module path) when the file names it directly; None as component: a bare peft key,
    # looked up in the U-Net and then the text encoder.
    target: tuple[str | None, str] | None = None
    kind: str = "lora"  # "lora", "loha", "lokr" (histolab.adapters.lycoris has the maths)
    factors: dict[str, Any] = field(default_factory=dict)  # LoHa / LoKr tensors by their key suffix
    magnitude: Any = None  # DoRA: kohya/LyCORIS ``dora_scale`` or peft ``lora_magnitude_vector``
    peft_magnitude: bool = False  # peft's layout (always per output) rather than LyCORIS's

    @property
    def tensors(self) -> list[Any]:
        return [t for t in (self.down, self.up, self.magnitude, *self.factors.values()) if t is not None]

    @property
    def rank(self) -> int | None:
        return int(self.down.shape[0]) if self.kind == "lora" else lycoris.rank(self.kind, self.factors)

    @property
    def scale(self) -> float:
        rank = self.rank
        return 1.0 if self.alpha is None or not rank else self.alpha / rank


@dataclass
class ResolvedLayer:
    component: str
    module: str
    down: Any
    up: Any
    scale: float
    conv: bool
    key: str
    layer: LoraLayer | None = None
    weight_shape: tuple[int, ...] = ()
    axis: str | None = None  # DoRA: "rows" or "columns"

    @property
    def dense(self) -> bool:
        """Applied as a full update of the layer's weight (LoHa, LoKr, DoRA) rather than two low-rank products."""
        return self.layer is not None and (self.layer.kind != "lora" or self.axis is not None)


@dataclass
class LoraWeights:
    layers: list[LoraLayer]
    format: str  # "peft", "diffusers", "kohya", "kohya-ldm"
    metadata: dict[str, str] = field(default_factory=dict)
    # Per base model (by its U-Net object): layers matched to modules, and cast to its dtype.
    _resolved: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary, repr=False)
    _cast: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary, repr=False)

    kind = "lora"

    @property
    def nbytes(self) -> int:
        """The file's tensors plus the full updates cached for LoHa/LoKr/DoRA layers (the runtime's cache budget)."""
        n = sum(t.element_size() * t.nelement() for layer in self.layers for t in layer.tensors)
        for cached in list(self._cast.values()):
            n += sum(d.element_size() * d.nelement() for *_, d, _m in cached[2] if d is not None)
        return n

    # ------------------------------------------------------------ validate
    def _match(self, model, name: str) -> tuple[list[ResolvedLayer], list[str]]:
        cached = self._resolved.get(model.unet)
        if cached is not None and cached[0] is model.text_encoder:
            return cached[1], cached[2]
        table = lora_targets(model.unet, model.text_encoder) if self.format.startswith("kohya") else None
        unknown, out = [], []
        for layer in self.layers:
            target = _find(model, layer.target or (table or {}).get(layer.key))
            if target is None:
                unknown.append(layer.key)
                continue
            out.append(_check_layer(name, layer, target, model))
        if not out:
            raise AdapterError(
                f"{name}: none of its {len(self.layers)} layers names a module of this base model, "
                f"e.g. {', '.join(unknown[:3])}{_hint(unknown)}"
            )
        self._resolved[model.unet] = (model.text_encoder, out, unknown)
        return out, unknown

    def validate(self, model, name: str = "LoRA") -> list[ResolvedLayer]:
        """Match the layers to modules of ``model`` and check their shapes; AdapterError names the first misfit.

        Layers naming modules this base lacks are left out (as diffusers/peft leave them) and listed by
        ``load_report``; a file none of whose layers fit is an error.
        """
        return self._match(model, name)[0]

    def load_report(self, model, name: str = "LoRA") -> LoadReport:
        resolved, unknown = self._match(model, name)
        kinds = sorted({r.layer.kind for r in resolved if r.layer is not None}, key=list(KIND_NAMES).index)
        what = FORMAT_NAMES.get(self.format, self.format)
        if kinds != ["lora"]:
            what += ", " + " + ".join(KIND_NAMES[k] for k in kinds)
        if any(r.axis for r in resolved):
            what += ", DoRA magnitudes"
        return LoadReport(
            name=name,
            format=what,
            unet_modules=sum(r.component == "unet" for r in resolved),
            text_encoder_modules=sum(r.component == "text_encoder" for r in resolved),
            ignored=[f"{k} (no such module in this base model)" for k in unknown],
        )

    def delta_weights(self, model, strength: float = 1.0, name: str = "LoRA") -> dict[tuple[str, str], Any]:
        """(component, module path) -> the change to that module's weight at ``strength`` (what fusing adds).

        The hooks ``apply`` adds compute exactly this change on the fly; tests compare it with diffusers' fused
        weights, and a caller may fuse with it.
        """
        import torch

        out = {}
        with torch.no_grad():
            for r, module, down, up, dense, magnitude in self._cast_for(model, self.validate(model, name)):
                out[(r.component, r.module)] = _effective(r, module, down, up, dense, magnitude, strength)
        return out

    # --------------------------------------------------------------- apply
    def apply(self, model, strength: float, edit: ModelEdit, name: str = "LoRA") -> None:
        resolved = self.validate(model, name)
        if strength == 0:
            return
        import torch

        with torch.no_grad():
            for r, module, down, up, dense, magnitude in self._cast_for(model, resolved):
                if not r.dense:
                    up_s = up * (strength * r.scale)
                    edit.hook(module, _conv_hook(down, up_s, module) if r.conv else _linear_hook(down, up_s))
                else:
                    delta = _effective(r, module, down, up, dense, magnitude, strength)
                    edit.hook(module, _dense_hook(delta, module, r.conv))

    def _cast_for(self, model, resolved):
        """(layer, module, down, up, dense update, magnitude) in the model's dtype and device, cached per model."""
        import torch

        key = (str(model.device), model.dtype)
        cached = self._cast.get(model.unet)
        if cached is None or cached[0] != key or cached[1] is not resolved:
            roots = {c: getattr(model, c) for c in COMPONENTS}
            cast = []
            with torch.no_grad():
                for r in resolved:
                    module = roots[r.component].get_submodule(r.module)
                    down = up = dense = magnitude = None
                    if r.down is not None:
                        down, up = r.down.to(model.device, model.dtype), r.up.to(model.device, model.dtype)
                    if r.dense:
                        layer = r.layer
                        if layer.kind == "lora":
                            full = lycoris.low_rank_dense(r.down.float(), r.up.float(), r.weight_shape)
                        else:
                            factors = {k: v.float() for k, v in layer.factors.items()}
                            full = lycoris.dense(layer.kind, factors, r.weight_shape)
                        dense = (full * r.scale).to(model.device, model.dtype)
                        if layer.magnitude is not None:
                            magnitude = layer.magnitude.to(model.device, torch.float32)
                    cast.append((r, module, down, up, dense, magnitude))
            cached = (key, resolved, cast)
            self._cast[model.unet] = cached
        return cached[2]


def _effective(r: ResolvedLayer, module, down, up, dense, magnitude, strength: float):
    """The change to ``module.weight`` at ``strength``."""
    import torch

    if not r.dense:
        return lycoris.low_rank_dense(down, up * (strength * r.scale), r.weight_shape)
    if magnitude is None:
        return dense * strength
    weight = module.weight.detach()
    delta = lycoris.decompose(weight.float(), dense.float(), magnitude, r.axis, float(strength))
    return delta.to(weight.dtype) if weight.dtype != torch.float32 else delta


def _find(model, target: tuple[str | None, str] | None) -> tuple[str, str] | None:
    """The (component, module path) that exists in ``model`` for a target, text-encoder names in either spelling."""
    if target is None:
        return None
    component, path = target
    for comp in (component,) if component else COMPONENTS:
        root = getattr(model, comp)
        spelled = te_path(root, path) if comp == "text_encoder" else path
        try:
            root.get_submodule(spelled)
        except AttributeError:
            continue
        return comp, spelled
    return None


def _hint(unknown: list[str]) -> str:
    if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for k in unknown):
        return " (it has a second text encoder: an SDXL LoRA, which does not fit an SD-1.5-family model)"
    if any("transformer_blocks_1_" in k or "transformer_blocks.1." in k for k in unknown):
        return " (several transformer blocks per attention: an SDXL LoRA on an SD-1.5-family base)"
    if any(k.startswith(("lora_te_", "text_encoder.")) for k in unknown) and not any(
        k.startswith(("lora_unet_", "unet.")) for k in unknown
    ):
        return " (text-encoder layers only, named for a text encoder of another size or family)"
    return " (is it for another base model, such as SDXL, SD 3 or Flux?)"


def _check_layer(name: str, layer: LoraLayer, target: tuple[str, str], model) -> ResolvedLayer:
    import torch

    component, path = target
    module = getattr(model, component).get_submodule(path)
    for t in layer.tensors:
        if not t.is_floating_point():
            raise AdapterError(f"{name}: {layer.key}: a tensor has dtype {t.dtype}; LoRA weights must be floats")
    if isinstance(module, torch.nn.Linear):
        weight_shape = (module.out_features, module.in_features)
        conv = False
    elif isinstance(module, torch.nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros":
            raise AdapterError(f"{name}: {layer.key}: LoRA on a grouped or non-zero-padded convolution ({path})")
        weight_shape = (module.out_channels, module.in_channels, *module.kernel_size)
        conv = True
    else:
        raise AdapterError(
            f"{name}: {layer.key}: {component}.{path} is a {type(module).__name__}, not a Linear or Conv2d"
        )
    down = up = None
    if layer.kind == "lora":
        down, up = _check_low_rank(name, layer, component, path, weight_shape, conv)
    else:
        why = lycoris.check(layer.kind, layer.factors, weight_shape)
        if why:
            raise AdapterError(f"{name}: {layer.key}: {KIND_NAMES[layer.kind]} for {component}.{path} {why}")
    axis = None
    if layer.magnitude is not None:
        axis = lycoris.magnitude_axis(layer.magnitude, weight_shape, layer.peft_magnitude)
        if axis is None:
            raise AdapterError(
                f"{name}: {layer.key}: its DoRA magnitude has shape {list(layer.magnitude.shape)}, but "
                f"{component}.{path} has {weight_shape[0]} outputs and {weight_shape[1]} inputs"
            )
    return ResolvedLayer(component, path, down, up, layer.scale, conv, layer.key, layer, weight_shape, axis)


# Input widths that name the model a layer was made for, where they differ from this base's.
_WIDTHS = {2048: "SDXL's text tokens", 1280: "SDXL's", 1024: "SD 2.x's text tokens"}


def _width_hint(got: int, want: int) -> str:
    return f" ({got} wide, {_WIDTHS[got]}: a LoRA for another base model)" if got != want and got in _WIDTHS else ""


def _check_low_rank(name, layer, component, path, weight_shape, conv):
    down, up = layer.down, layer.up
    rank = layer.rank
    if not conv:
        if down.ndim == 4 and tuple(down.shape[2:]) == (1, 1):
            down = down.flatten(1)
        if up.ndim == 4 and tuple(up.shape[2:]) == (1, 1):
            up = up.flatten(1)
        want_down, want_up = (rank, weight_shape[1]), (weight_shape[0], rank)
    else:
        if down.ndim == 2:
            down = down[:, :, None, None]
        if up.ndim == 2:
            up = up[:, :, None, None]
        want_down, want_up = (rank, *weight_shape[1:]), (weight_shape[0], rank, 1, 1)
    if tuple(down.shape) != want_down:
        raise AdapterError(
            f"{name}: {layer.key}: lora_down for {component}.{path} must have shape {list(want_down)} "
            f"but has {list(layer.down.shape)}{_width_hint(int(down.shape[1]), want_down[1])}"
        )
    if tuple(up.shape) != want_up:
        raise AdapterError(
            f"{name}: {layer.key}: lora_up for {component}.{path} must have shape {list(want_up)} "
            f"but has {list(layer.up.shape)}"
        )
    return down, up


def _linear_hook(down, up):
    import torch.nn.functional as F

    def hook(module, args, output):
        return output + F.linear(F.linear(args[0], down), up)

    return hook


def _conv_hook(down, up, module):
    import torch.nn.functional as F

    stride, padding, dilation = module.stride, module.padding, module.dilation

    def hook(mod, args, output):
        return output + F.conv2d(F.conv2d(args[0], down, None, stride, padding, dilation), up)

    return hook


def _dense_hook(delta, module, conv: bool):
    """Adds ``x -> x @ delta.T`` (or the convolution with ``delta``): the layer as if ``delta`` were fused in."""
    import torch.nn.functional as F

    if not conv:

        def hook(mod, args, output):
            return output + F.linear(args[0], delta)

        return hook
    stride, padding, dilation = module.stride, module.padding, module.dilation

    def conv_hook(mod, args, output):
        return output + F.conv2d(args[0], delta, None, stride, padding, dilation)

    return conv_hook


# ------------------------------------------------------------------ parsing


def is_lora_state(tensors: dict) -> bool:
    keys = [k for k in tensors if isinstance(k, str)]
    return bool(keys) and any(
        k.startswith(_KOHYA_PREFIXES)
        or _PEFT_AB.match(k)
        or _DIFFUSERS_DU.match(k)
        or _ATTN_PROC.match(k)
        or _unsupported(k)
        for k in keys
    )


def from_state(
    tensors: dict,
    metadata: dict | None = None,
    config: dict | None = None,
    where: str = "LoRA",
    peft_config: dict | None = None,
):
    """A ``LoraWeights`` from a state dict in any of the layouts above.

    ``config``: our manifest's training config (its ``alpha``); ``peft_config``: a peft folder's
    adapter_config.json (``lora_alpha``, ``alpha_pattern``, ``use_rslora``).
    """
    metadata = dict(metadata or {})
    keys = list(tensors)
    for k in keys:
        if not isinstance(k, str):
            raise AdapterError(f"{where}: a LoRA file's keys must be text, found {k!r}")
        what = _unsupported(k)
        if what:
            raise AdapterError(
                f"{where}: {k} is {what}, which histolab does not load "
                "(it loads LoRA, LoCon, LoHa, LoKr and DoRA networks)"
            )
    if any(k.startswith(_KOHYA_PREFIXES) for k in keys):
        return _from_kohya(tensors, metadata, where)
    return _from_diffusers(tensors, metadata, config or {}, where, peft_config or {})


def _scalar(t, key: str, where: str) -> float:
    if t.numel() != 1 or (not t.is_floating_point() and t.dtype not in _int_dtypes()):
        raise AdapterError(f"{where}: {key} must be a single number but has shape {list(t.shape)}")
    return float(t.reshape(()).item())


def _int_dtypes():
    import torch

    return (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _from_kohya(tensors, metadata, where):
    groups: dict[str, dict[str, Any]] = {}
    for k, t in tensors.items():
        base, _, part = k.partition(".")
        if part not in _KOHYA_PARTS:
            raise AdapterError(
                f"{where}: unexpected key {k} (expected .lora_down.weight, .lora_up.weight, .alpha, .dora_scale, "
                ".hada_* or .lokr_*)"
            )
        groups.setdefault(base, {})[part] = t
    layers, ldm = [], False
    for base, parts in groups.items():
        alpha = _scalar(parts["alpha"], f"{base}.alpha", where) if "alpha" in parts else None
        ldm = ldm or any(s in base for s in ("_input_blocks_", "_middle_block_", "_output_blocks_"))
        factors = {k: v for k, v in parts.items() if k in LOHA_KEYS or k in LOKR_KEYS}
        magnitude = parts.get("dora_scale")
        if factors:
            kind = "loha" if any(k in LOHA_KEYS for k in factors) else "lokr"
            if (kind == "loha" and any(k in LOKR_KEYS for k in factors)) or "lora_down.weight" in parts:
                raise AdapterError(f"{where}: {base} mixes the keys of two network types ({', '.join(sorted(parts))})")
            layers.append(LoraLayer(base, None, None, alpha, kind=kind, factors=factors, magnitude=magnitude))
            continue
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            missing = "lora_up" if "lora_down.weight" in parts else "lora_down"
            raise AdapterError(f"{where}: {base} has no {missing}.weight")
        if "lora_mid.weight" in parts:  # LoCon with a Tucker core: a convolution's update in three factors
            cp = {k: parts[k] for k in CP_KEYS}
            layers.append(LoraLayer(base, None, None, alpha, kind="lora_cp", factors=cp, magnitude=magnitude))
            continue
        layers.append(LoraLayer(base, parts["lora_down.weight"], parts["lora_up.weight"], alpha, magnitude=magnitude))
    return LoraWeights(layers, "kohya-ldm" if ldm else "kohya", metadata)


def _component_of(mod: str, where: str) -> tuple[str | None, str]:
    """(component, module path); None as component for keys without one (looked up in both networks)."""
    mod = mod.removeprefix("base_model.model.")  # peft's save_pretrained
    head, _, rest = mod.partition(".")
    if head in ("unet", "text_encoder"):
        return head, rest
    if head in ("text_encoder_2", "transformer"):
        raise AdapterError(f"{where}: it has {head} layers ({mod}): a LoRA for SDXL or a DiT model, not SD 1.5")
    return None, mod  # attention-processor files and bare peft files carry no prefix


def _from_diffusers(tensors, metadata, config, where, peft_config):
    pairs: dict[tuple[str | None, str], dict[str, Any]] = {}
    alphas: dict[tuple[str | None, str], float] = {}
    magnitudes: dict[tuple[str | None, str], Any] = {}
    fmt = "peft"
    for k, t in tensors.items():
        m = _PEFT_AB.match(k)
        if m:
            target = _component_of(m["mod"], where)
            pairs.setdefault(target, {})["down" if m["ab"] == "A" else "up"] = t
            continue
        m = _ATTN_PROC.match(k)
        if m:
            component, mod = _component_of(m["mod"], where)
            component = component or "unet"  # attention processors are the U-Net's
            proj = m["proj"]
            if component == "unet":
                path = f"{mod}.{'to_out.0' if proj == 'to_out' else proj}"
            else:
                path = f"{mod}.{ {'to_q': 'q_proj', 'to_k': 'k_proj', 'to_v': 'v_proj', 'to_out': 'out_proj'}[proj] }"
            pairs.setdefault((component, path), {})[m["du"]] = t
            fmt = "diffusers"
            continue
        m = _DIFFUSERS_DU.match(k)
        if m:
            pairs.setdefault(_component_of(m["mod"], where), {})[m["du"]] = t
            fmt = "diffusers"
            continue
        m = _MAGNITUDE.match(k)
        if m:
            magnitudes[_component_of(m["mod"], where)] = t
            continue
        m = _ALPHA.match(k)
        if m:
            alphas[_component_of(m["mod"], where)] = _scalar(t, k, where)
            continue
        raise AdapterError(
            f"{where}: {k} is not a LoRA weight (expected lora_A/lora_B, lora.down/lora.up, "
            "lora_magnitude_vector or alpha)"
        )
    if not pairs:
        raise AdapterError(f"{where}: no LoRA weights in the file")
    stray = [t for t in magnitudes if t not in pairs]
    if stray:
        raise AdapterError(f"{where}: a DoRA magnitude for {'.'.join(p for p in stray[0] if p)} without its LoRA")
    meta_alpha = _metadata_alphas(metadata, config, peft_config)
    layers = []
    for (component, path), parts in sorted(pairs.items(), key=lambda kv: (kv[0][0] or "", kv[0][1])):
        named = f"{component}.{path}" if component else path
        if "down" not in parts or "up" not in parts:
            raise AdapterError(f"{where}: {named} has only one of its two LoRA matrices")
        alpha = alphas.get((component, path))
        if alpha is None:
            alpha = meta_alpha(component, path, int(parts["down"].shape[0]))
        magnitude = magnitudes.get((component, path))
        layers.append(
            LoraLayer(
                named,
                parts["down"],
                parts["up"],
                alpha,
                (component, path),
                magnitude=magnitude,
                peft_magnitude=magnitude is not None,
            )
        )
    return LoraWeights(layers, fmt, metadata)


def _pattern_value(pattern: dict, path: str):
    """peft's rule for ``rank_pattern`` / ``alpha_pattern`` keys: the key matches the module name's end."""
    for key, value in (pattern or {}).items():
        try:
            if re.match(rf"(.*\.)?({key})$", path):
                return value
        except re.error:
            if path == key or path.endswith("." + key):
                return value
    return None


def _metadata_alphas(metadata: dict, config: dict, peft_config: dict):
    """alpha for a layer from diffusers' ``lora_adapter_metadata`` (peft LoraConfig per component), a peft folder's
    adapter_config.json, or our manifest. rsLoRA (scale alpha / sqrt(rank)) is returned as alpha * sqrt(rank)."""
    packed: dict[str, Any] = {}
    raw = metadata.get("lora_adapter_metadata")
    if raw:
        try:
            packed = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise AdapterError(f"lora_adapter_metadata is not valid JSON ({exc})") from exc

    def alpha(component: str | None, path: str, rank: int) -> float | None:
        prefix = f"{component}." if component else ""
        cfg = {k.removeprefix(prefix): v for k, v in packed.items() if k.startswith(prefix)} if packed else peft_config
        value = _pattern_value(cfg.get("alpha_pattern") or {}, path)
        if value is None and cfg.get("lora_alpha") is not None:
            value = cfg["lora_alpha"]
        if value is None and "alpha" in config:
            value = config["alpha"]
        if value is None:
            return None  # alpha = rank, as diffusers' training scripts set it
        return float(value) * (rank**0.5 if cfg.get("use_rslora") else 1.0)

    return alpha


# ------------------------------------------------------------------- saving


def save(folder: str | Path, layers: list[tuple[str, str, Any, Any]], alpha: float, manifest) -> Path:
    """Write a LoRA in our format: peft keys (``unet.<module>.lora_A.weight``) + diffusers metadata + manifest.

    ``layers``: (component, module path, down, up). The same alpha for every layer.
    diffusers' ``load_lora_weights`` reads the file as it is.
    """
    from safetensors.torch import save_file

    from histolab.adapters.manifest import write_manifest

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state, packed = {}, {}
    for component, path, down, up in layers:
        state[f"{component}.{path}.lora_A.weight"] = down.detach().contiguous().cpu()
        state[f"{component}.{path}.lora_B.weight"] = up.detach().contiguous().cpu()
        packed[f"{component}.r"] = int(down.shape[0])
        packed[f"{component}.lora_alpha"] = float(alpha)
        packed.setdefault(f"{component}.target_modules", set()).add(path)
    for k, v in list(packed.items()):
        if isinstance(v, set):
            packed[k] = sorted(v)
    out = folder / (manifest.weights or WEIGHTS_NAME)
    save_file(state, str(out), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(packed, sort_keys=True)})
    manifest.weights = out.name
    manifest.config.setdefault("alpha", float(alpha))
    manifest.config.setdefault("rank", max((int(d.shape[0]) for _, _, d, _ in layers), default=0))
    write_manifest(folder, manifest)
    return out
