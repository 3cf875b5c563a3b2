"""LoRA: low-rank updates ``W + strength * (alpha / rank) * up @ down`` on Linear and Conv2d layers.

Files read, decided by their keys (never by their names):

* diffusers / peft: ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (peft),
  ``unet.<module>.lora.down.weight`` / ``lora.up.weight`` (diffusers 0.17-0.20),
  ``...lora_linear_layer.down.weight`` (old text-encoder LoRA),
  ``...attn1.processor.to_q_lora.down.weight`` (attention-processor LoRA); alpha
  from ``<module>.alpha`` keys or the ``lora_adapter_metadata`` header, else alpha = rank;
* kohya-ss sd-scripts and SD-webui: ``lora_unet_* / lora_te_*`` with
  ``.lora_down.weight``, ``.lora_up.weight`` and ``.alpha``, in diffusers-style
  (``down_blocks_1_attentions_0``) or LDM-style (``input_blocks_4_1``) names,
  including conv LoRA (LoCon) on 3x3 convolutions.

Applying adds one forward hook per layer, which adds the low-rank update to
the layer's output; base weights are never written, so removing the hooks
restores the model exactly and several LoRAs combine by simply stacking.
"""

from __future__ import annotations

import json
import re
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from histolab.adapters.edit import ModelEdit
from histolab.adapters.kohya import lora_targets
from histolab.errors import AdapterError

WEIGHTS_NAME = "adapter.safetensors"
COMPONENTS = ("unet", "text_encoder")

# Other low-rank formats: named so the error says what the file is.
_UNSUPPORTED = {
    ".hada_": "LoHa (LyCORIS)",
    ".lokr_": "LoKr (LyCORIS)",
    ".lora_mid.": "LoCon with Tucker decomposition (LyCORIS)",
    ".dora_scale": "DoRA",
    ".lora_magnitude_vector": "DoRA",
    ".on_input": "IA3 (LyCORIS)",
    ".oft_": "OFT",
}


def _unsupported(key: str) -> str | None:
    if key.endswith((".diff", ".diff_b")):
        return "a full-weight difference (LyCORIS 'full')"
    return next((what for marker, what in _UNSUPPORTED.items() if marker in key), None)


_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")
_PEFT_AB = re.compile(r"^(?P<mod>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")
_DIFFUSERS_DU = re.compile(r"^(?P<mod>.+)\.(?:lora|lora_linear_layer)\.(?P<du>down|up)\.weight$")
_ATTN_PROC = re.compile(
    r"^(?P<mod>.+?)(?:\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<du>down|up)\.weight$"
)
_ALPHA = re.compile(r"^(?P<mod>.+)\.alpha$")


@dataclass
class LoraLayer:
    """One layer's update as read from a file; ``target`` is resolved against a model later."""

    key: str  # the layer's name in the file, for messages
    down: Any  # (rank, in) or (rank, in, kh, kw)
    up: Any  # (out, rank) or (out, rank, 1, 1)
    alpha: float | None  # None: alpha = rank (scale 1)
    target: tuple[str, str] | None = None  # (component, module path) when the file names it directly

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank


@dataclass
class ResolvedLayer:
    component: str
    module: str
    down: Any
    up: Any
    scale: float
    conv: bool
    key: str


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
        return sum(t.element_size() * t.nelement() for layer in self.layers for t in (layer.down, layer.up))

    # ------------------------------------------------------------ validate
    def validate(self, model, name: str = "LoRA") -> list[ResolvedLayer]:
        """Match every layer to a module of ``model`` and check its shapes; AdapterError names the first misfit."""
        cached = self._resolved.get(model.unet)
        if cached is not None and cached[0] is model.text_encoder:
            return cached[1]
        table = lora_targets(model.unet, model.text_encoder) if self.format.startswith("kohya") else None
        unknown, out = [], []
        for layer in self.layers:
            target = layer.target or (table or {}).get(layer.key)
            if target is None:
                unknown.append(layer.key)
                continue
            out.append(_check_layer(name, layer, target, model))
        if unknown:
            raise AdapterError(
                f"{name}: {len(unknown)} of {len(self.layers)} layers name modules this base model does not have, "
                f"e.g. {', '.join(unknown[:3])}{_hint(unknown)}"
            )
        self._resolved[model.unet] = (model.text_encoder, out)
        return out

    # --------------------------------------------------------------- apply
    def apply(self, model, strength: float, edit: ModelEdit, name: str = "LoRA") -> None:
        resolved = self.validate(model, name)
        if strength == 0:
            return
        import torch

        with torch.no_grad():
            for layer, module, down, up in self._cast_for(model, resolved):
                up_s = up * (strength * layer.scale)
                edit.hook(module, _conv_hook(down, up_s, module) if layer.conv else _linear_hook(down, up_s))

    def _cast_for(self, model, resolved):
        """(layer, module, down, up) in the model's dtype and device, cached per model."""
        import torch

        key = (str(model.device), model.dtype)
        cached = self._cast.get(model.unet)
        if cached is None or cached[0] != key or cached[1] is not resolved:
            roots = {c: getattr(model, c) for c in COMPONENTS}
            with torch.no_grad():
                cast = [
                    (
                        r,
                        roots[r.component].get_submodule(r.module),
                        r.down.to(model.device, model.dtype),
                        r.up.to(model.device, model.dtype),
                    )
                    for r in resolved
                ]
            cached = (key, resolved, cast)
            self._cast[model.unet] = cached
        return cached[2]


def _hint(unknown: list[str]) -> str:
    if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for k in unknown):
        return " (it has a second text encoder: an SDXL LoRA, which does not fit an SD-1.5-family model)"
    if any(k.startswith(("lora_te_", "text_encoder.")) for k in unknown) and not any(
        k.startswith(("lora_unet_", "unet.")) for k in unknown
    ):
        return " (text-encoder layers only: a text encoder of another size or family)"
    return " (is it for another base model, such as SDXL or SD 2?)"


def _check_layer(name: str, layer: LoraLayer, target: tuple[str, str], model) -> ResolvedLayer:
    import torch

    component, path = target
    root = getattr(model, component)
    try:
        module = root.get_submodule(path)
    except AttributeError:
        raise AdapterError(f"{name}: {layer.key}: the base model's {component} has no module {path}") from None
    down, up = layer.down, layer.up
    for what, t in (("down", down), ("up", up)):
        if not t.is_floating_point():
            raise AdapterError(f"{name}: {layer.key}: lora_{what} has dtype {t.dtype}; LoRA weights must be floats")
    if isinstance(module, torch.nn.Linear):
        if down.ndim == 4 and tuple(down.shape[2:]) == (1, 1):
            down = down.flatten(1)
        if up.ndim == 4 and tuple(up.shape[2:]) == (1, 1):
            up = up.flatten(1)
        want_down = (layer.rank, module.in_features)
        want_up = (module.out_features, layer.rank)
        conv = False
    elif isinstance(module, torch.nn.Conv2d):
        if module.groups != 1 or module.padding_mode != "zeros":
            raise AdapterError(f"{name}: {layer.key}: LoRA on a grouped or non-zero-padded convolution ({path})")
        if down.ndim == 2:
            down = down[:, :, None, None]
        if up.ndim == 2:
            up = up[:, :, None, None]
        want_down = (layer.rank, module.in_channels, *module.kernel_size)
        want_up = (module.out_channels, layer.rank, 1, 1)
        conv = True
    else:
        raise AdapterError(
            f"{name}: {layer.key}: {component}.{path} is a {type(module).__name__}, not a Linear or Conv2d"
        )
    if tuple(down.shape) != want_down:
        raise AdapterError(
            f"{name}: {layer.key}: lora_down for {component}.{path} must have shape {list(want_down)} "
            f"but has {list(layer.down.shape)}"
        )
    if tuple(up.shape) != want_up:
        raise AdapterError(
            f"{name}: {layer.key}: lora_up for {component}.{path} must have shape {list(want_up)} "
            f"but has {list(layer.up.shape)}"
        )
    return ResolvedLayer(component, path, down, up, layer.scale, conv, layer.key)


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


def from_state(tensors: dict, metadata: dict | None = None, config: dict | None = None, where: str = "LoRA"):
    """A ``LoraWeights`` from a state dict in any of the layouts above."""
    metadata = dict(metadata or {})
    keys = list(tensors)
    for k in keys:
        if not isinstance(k, str):
            raise AdapterError(f"{where}: a LoRA file's keys must be text, found {k!r}")
        what = _unsupported(k)
        if what:
            raise AdapterError(f"{where}: {k} is {what}, which histolab does not load; only LoRA (lora_down/lora_up)")
    if any(k.startswith(_KOHYA_PREFIXES) for k in keys):
        return _from_kohya(tensors, metadata, where)
    return _from_diffusers(tensors, metadata, config or {}, where)


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
        if part not in ("lora_down.weight", "lora_up.weight", "alpha"):
            raise AdapterError(f"{where}: unexpected key {k} (expected .lora_down.weight, .lora_up.weight or .alpha)")
        groups.setdefault(base, {})[part] = t
    layers, ldm = [], False
    for base, parts in groups.items():
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            missing = "lora_up" if "lora_down.weight" in parts else "lora_down"
            raise AdapterError(f"{where}: {base} has no {missing}.weight")
        alpha = _scalar(parts["alpha"], f"{base}.alpha", where) if "alpha" in parts else None
        ldm = ldm or any(s in base for s in ("_input_blocks_", "_middle_block_", "_output_blocks_"))
        layers.append(LoraLayer(base, parts["lora_down.weight"], parts["lora_up.weight"], alpha))
    return LoraWeights(layers, "kohya-ldm" if ldm else "kohya", metadata)


def _component_of(mod: str, where: str) -> tuple[str, str]:
    for prefix in ("base_model.model.",):
        mod = mod.removeprefix(prefix)
    head, _, rest = mod.partition(".")
    if head in ("unet", "text_encoder"):
        return head, rest
    if head in ("text_encoder_2", "transformer"):
        raise AdapterError(f"{where}: it has {head} layers ({mod}): a LoRA for SDXL or a DiT model, not SD 1.5")
    return "unet", mod  # attention-processor and bare peft U-Net files carry no prefix


def _from_diffusers(tensors, metadata, config, where):
    pairs: dict[tuple[str, str], dict[str, Any]] = {}
    alphas: dict[tuple[str, str], float] = {}
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
        m = _ALPHA.match(k)
        if m:
            alphas[_component_of(m["mod"], where)] = _scalar(t, k, where)
            continue
        raise AdapterError(f"{where}: {k} is not a LoRA weight (expected lora_A/lora_B, lora.down/lora.up or alpha)")
    if not pairs:
        raise AdapterError(f"{where}: no LoRA weights in the file")
    meta_alpha = _metadata_alphas(metadata, config)
    layers = []
    for (component, path), parts in sorted(pairs.items()):
        if "down" not in parts or "up" not in parts:
            raise AdapterError(f"{where}: {component}.{path} has only one of its two LoRA matrices")
        alpha = alphas.get((component, path))
        if alpha is None:
            alpha = meta_alpha(component, path, int(parts["down"].shape[0]))
        layers.append(LoraLayer(f"{component}.{path}", parts["down"], parts["up"], alpha, (component, path)))
    return LoraWeights(layers, fmt, metadata)


def _metadata_alphas(metadata: dict, config: dict):
    """alpha for a layer from diffusers' ``lora_adapter_metadata`` (peft LoraConfig per component) or our manifest."""
    packed: dict[str, Any] = {}
    raw = metadata.get("lora_adapter_metadata")
    if raw:
        try:
            packed = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise AdapterError(f"lora_adapter_metadata is not valid JSON ({exc})") from exc

    def alpha(component: str, path: str, rank: int) -> float | None:
        pattern = packed.get(f"{component}.alpha_pattern") or {}
        for key, value in pattern.items():
            if path == key or path.endswith("." + key):
                return float(value)
        if f"{component}.lora_alpha" in packed:
            return float(packed[f"{component}.lora_alpha"])
        if "alpha" in config:
            return float(config["alpha"])
        return None  # alpha = rank, as diffusers' training scripts set it

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
