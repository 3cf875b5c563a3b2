"""HyperNetworks (SD-webui / NovelAI): small residual MLPs applied to the
attention context before the key and value projections.

For an attention layer whose context has width ``d`` (the text tokens for
cross-attention, the image features for self-attention), a hypernetwork with
modules for ``d`` computes ``k = to_k(c + s * mlp_k(c))`` and
``v = to_v(c + s * mlp_v(c))``, ``s`` being the strength. Which layers it
touches is decided by width, as in SD-webui: a file with modules for 768 only
changes SD 1.5's cross-attention; one with 320/640/1280 too also changes its
self-attention.

SD-webui's ``.pt`` layout (opened with ``torch.load(weights_only=True)``)::

    {768: (k_state_dict, v_state_dict), 320: (...), ...,
     "layer_structure": [1, 2, 1], "activation_func": "relu", "is_layer_norm": False,
     "weight_initialization": "Normal", "use_dropout": False, "dropout_structure": [...],
     "activate_output": False, "last_layer_dropout": False, "name": ..., "step": ..., ...}

each state dict holding ``linear.<i>.weight`` / ``linear.<i>.bias`` of an
``nn.Sequential`` built from those options (Linear, activation, LayerNorm,
Dropout per stage); the oldest files use ``linear1``/``linear2``.
Our own form is safetensors (``<dim>.k.linear.<i>.weight``) with the options
in the manifest and the file's metadata.

Applied through diffusers' attention-processor extension point
(``unet.set_attn_processor``); removing puts the previous processors back.
"""

from __future__ import annotations

import inspect
import json
import re
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from histolab.adapters.edit import ModelEdit
from histolab.adapters.report import LoadReport
from histolab.errors import AdapterError

WEIGHTS_NAME = "hypernetwork.safetensors"
_OUR_KEY = re.compile(r"^(\d+)\.([kv])\.(linear\.\d+\.(?:weight|bias))$")

# SD-webui's activation names: its own short list, then every class in
# torch.nn.modules.activation by lower-cased name ("swish" is Hardswish there).
ACTIVATIONS: dict[str, type] = {
    "relu": torch.nn.ReLU,
    "leakyrelu": torch.nn.LeakyReLU,
    "elu": torch.nn.ELU,
    "swish": torch.nn.Hardswish,
    "tanh": torch.nn.Tanh,
    "sigmoid": torch.nn.Sigmoid,
}
for _name, _cls in inspect.getmembers(torch.nn.modules.activation, inspect.isclass):
    if _cls.__module__ == "torch.nn.modules.activation":
        ACTIVATIONS.setdefault(_name.lower(), _cls)


@dataclass
class HypernetworkOptions:
    layer_structure: list[float] = field(default_factory=lambda: [1.0, 2.0, 1.0])  # SD-webui's default
    activation_func: str | None = None  # None or "linear": no activation
    add_layer_norm: bool = False
    # SD-webui treats a file without this flag as True (its loader's default).
    activate_output: bool = True
    dropout_structure: list[float] | None = None  # only shapes the module list; dropout is off at inference
    weight_initialization: str = "Normal"  # recorded, not used to load

    def check(self, where: str) -> None:
        ls = self.layer_structure
        if not (isinstance(ls, list) and len(ls) >= 2 and all(isinstance(x, (int, float)) and x > 0 for x in ls)):
            raise AdapterError(f"{where}: layer_structure must be a list of positive numbers but is {ls!r}")
        if ls[0] != 1 or ls[-1] != 1:
            raise AdapterError(f"{where}: layer_structure must start and end with 1 but is {ls!r}")
        if self.activation_func not in (None, "linear") and self.activation_func not in ACTIVATIONS:
            raise AdapterError(f"{where}: unsupported activation_func {self.activation_func!r}")
        ds = self.dropout_structure
        if ds is not None and not (isinstance(ds, list) and len(ds) == len(ls) and all(0 <= x < 1 for x in ds)):
            raise AdapterError(
                f"{where}: dropout_structure {ds!r} must have one value in [0, 1) per layer_structure entry"
            )


def dropout_structure(layer_structure: list[float], use_dropout: bool, last_layer_dropout: bool) -> list[float]:
    """SD-webui's rule for files that record only ``use_dropout``/``last_layer_dropout``."""
    if not use_dropout:
        return [0.0] * len(layer_structure)
    values = [0.0] + [0.3] * (len(layer_structure) - 3)
    values.append(0.3 if last_layer_dropout else 0.0)
    values.append(0.0)
    return values


class HypernetworkModule(torch.nn.Module):
    """``x + multiplier * linear(x)``, with ``linear`` laid out exactly as SD-webui builds it."""

    def __init__(self, dim: int, opts: HypernetworkOptions):
        super().__init__()
        ls, layers = opts.layer_structure, []
        for i in range(len(ls) - 1):
            layers.append(torch.nn.Linear(int(dim * ls[i]), int(dim * ls[i + 1])))
            last = i >= len(ls) - 2
            if opts.activation_func not in (None, "linear") and not (last and not opts.activate_output):
                try:
                    layers.append(ACTIVATIONS[opts.activation_func]())
                except TypeError as exc:
                    raise AdapterError(f"activation {opts.activation_func!r} needs arguments: {exc}") from exc
            if opts.add_layer_norm:
                layers.append(torch.nn.LayerNorm(int(dim * ls[i + 1])))
            if opts.dropout_structure is not None and opts.dropout_structure[i + 1] > 0:
                layers.append(torch.nn.Dropout(p=opts.dropout_structure[i + 1]))
        self.linear = torch.nn.Sequential(*layers)
        self.multiplier = 1.0

    def forward(self, x):
        return x + self.linear(x) * self.multiplier


@dataclass
class Hypernetwork:
    options: HypernetworkOptions
    modules: dict[int, tuple[HypernetworkModule, HypernetworkModule]]  # float32, CPU, eval
    format: str  # "sd-webui-pt", "histolab"
    info: dict[str, Any] = field(default_factory=dict)  # name, step, sd_checkpoint(_name) from SD-webui
    _targets: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary, repr=False)

    kind = "hypernetwork"

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for pair in self.modules.values() for m in pair for p in m.parameters())

    def validate(self, model, name: str = "hypernetwork") -> dict[str, int]:
        """The attention layers it applies to (processor name -> width); AdapterError when none."""
        cached = self._targets.get(model.unet)
        if cached is not None:
            return cached
        targets = {}
        widths = set()
        for proc_name in model.unet.attn_processors:
            attn = model.unet.get_submodule(proc_name.removesuffix(".processor"))
            width = int(attn.cross_attention_dim)
            widths.add(width)
            if width in self.modules:
                targets[proc_name] = width
        if not targets:
            raise AdapterError(
                f"{name}: it has modules for context widths {sorted(self.modules)}, but this base model's "
                f"attention layers have context widths {sorted(widths)}: it was made for another base model"
            )
        self._targets[model.unet] = targets
        return targets

    def load_report(self, model, name: str = "hypernetwork") -> LoadReport:
        targets = self.validate(model, name)
        used = set(targets.values())
        o = self.options
        return LoadReport(
            name=name,
            format=f"{'SD-webui hypernetwork (.pt)' if self.format == 'sd-webui-pt' else 'histolab hypernetwork'}, "
            f"layers {o.layer_structure}, {o.activation_func or 'linear'}{', layer norm' if o.add_layer_norm else ''}",
            unet_modules=len(targets),
            ignored=[
                f"modules for context width {w} (no attention layer of that width)"
                for w in self.modules
                if w not in used
            ],
        )

    def apply(self, model, strength: float, edit: ModelEdit, name: str = "hypernetwork") -> None:
        targets = self.validate(model, name)
        if strength == 0:
            return
        current = dict(model.unet.attn_processors)
        for proc_name in targets:
            if not isinstance(current[proc_name], (HypernetworkAttnProcessor, *_standard_processors())):
                raise AdapterError(
                    f"{name}: the attention layer {proc_name} uses {type(current[proc_name]).__name__}; "
                    "a hypernetwork only combines with diffusers' standard attention processors"
                )
        device = next(model.unet.parameters()).device
        stages = {w: (_on(k, device), _on(v, device), float(strength)) for w, (k, v) in self.modules.items()}
        new = dict(current)
        for proc_name, width in targets.items():
            prev = current[proc_name]
            chain = prev.stages if isinstance(prev, HypernetworkAttnProcessor) else []
            new[proc_name] = HypernetworkAttnProcessor([*chain, stages[width]])
        model.unet.set_attn_processor(dict(new))  # set_attn_processor consumes the dict it gets
        edit.on_undo(lambda: model.unet.set_attn_processor(dict(current)))


def _on(module: HypernetworkModule, device) -> HypernetworkModule:
    return module if next(module.parameters()).device == device else module.to(device)


def _standard_processors() -> tuple[type, ...]:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    return (AttnProcessor, AttnProcessor2_0)


class HypernetworkAttnProcessor:
    """diffusers' scaled-dot-product attention, with the hypernetworks applied to the key and value contexts.

    A plain object, not an nn.Module, so the U-Net's state dict does not change while it is set.
    """

    def __init__(self, stages: list[tuple[HypernetworkModule, HypernetworkModule, float]]):
        self.stages = stages

    def _contexts(self, context):
        ck = cv = context.float()  # SD-webui runs hypernetworks in float32
        for k_mod, v_mod, s in self.stages:
            ck = ck + k_mod.linear(ck) * s
            cv = cv + v_mod.linear(cv) * s
        return ck.to(context.dtype), cv.to(context.dtype)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        import torch.nn.functional as F

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, seq_len, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        context_k, context_v = self._contexts(encoder_hidden_states)
        key = attn.to_k(context_k)
        value = attn.to_v(context_v)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


# ------------------------------------------------------------------ parsing


def is_sdwebui_state(obj: dict) -> bool:
    return any(isinstance(k, int) for k in obj) or "layer_structure" in obj


def is_our_state(tensors: dict) -> bool:
    return bool(tensors) and all(isinstance(k, str) and _OUR_KEY.match(k) for k in tensors)


def from_sdwebui(obj: dict, where: str) -> Hypernetwork:
    ls = obj.get("layer_structure", [1, 2, 1])
    ls = [float(x) for x in ls] if isinstance(ls, (list, tuple)) else ls
    use_dropout = bool(obj.get("use_dropout", False))
    ds = obj.get("dropout_structure")
    if ds is not None:
        ds = [float(x) for x in ds] if isinstance(ds, (list, tuple)) else ds
        use_dropout = use_dropout or any(ds)
    opts = HypernetworkOptions(
        layer_structure=ls,
        activation_func=obj.get("activation_func"),
        add_layer_norm=bool(obj.get("is_layer_norm", False)),
        activate_output=bool(obj.get("activate_output", True)),
        dropout_structure=ds,
        weight_initialization=str(obj.get("weight_initialization", "Normal")),
    )
    opts.check(where)
    if opts.dropout_structure is None and isinstance(ls, list):
        opts.dropout_structure = dropout_structure(ls, use_dropout, bool(obj.get("last_layer_dropout", False)))
    states = {}
    for k, v in obj.items():
        if isinstance(k, int):
            if not (isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(s, dict) for s in v)):
                raise AdapterError(f"{where}: entry {k} must be a pair of state dicts (key, value)")
            states[k] = (_fix_old(v[0]), _fix_old(v[1]))
    if not states:
        raise AdapterError(f"{where}: a hypernetwork file without any modules (no integer width keys)")
    info = {
        k: obj[k] for k in ("name", "step", "sd_checkpoint", "sd_checkpoint_name") if isinstance(obj.get(k), (str, int))
    }
    return Hypernetwork(opts, _build(states, opts, where), "sd-webui-pt", info)


def _fix_old(sd: dict) -> dict:
    """The first hypernetworks named their two layers linear1/linear2."""
    renames = {"linear1.weight": "linear.0.weight", "linear1.bias": "linear.0.bias"}
    renames |= {"linear2.weight": "linear.1.weight", "linear2.bias": "linear.1.bias"}
    return {renames.get(k, k): v for k, v in sd.items()}


def from_ours(tensors: dict, options: dict, where: str) -> Hypernetwork:
    known = set(HypernetworkOptions.__dataclass_fields__)
    opts = HypernetworkOptions(**{k: v for k, v in options.items() if k in known})
    opts.check(where)
    states: dict[int, tuple[dict, dict]] = {}
    for key, t in tensors.items():
        width, kv, rest = _OUR_KEY.match(key).groups()
        pair = states.setdefault(int(width), ({}, {}))
        pair[0 if kv == "k" else 1][rest] = t
    return Hypernetwork(opts, _build(states, opts, where), "histolab")


def _build(states: dict[int, tuple[dict, dict]], opts: HypernetworkOptions, where: str):
    modules = {}
    for width, pair in sorted(states.items()):
        if not 1 <= width <= 16384:
            raise AdapterError(f"{where}: context width {width} is out of range")
        built = []
        for which, sd in zip("kv", pair, strict=True):
            m = HypernetworkModule(width, opts)
            want = m.state_dict()
            for key in sorted(set(want) | set(sd)):
                if key not in sd:
                    raise AdapterError(f"{where}: module {width}/{which} lacks {key} (options say {_layout(opts)})")
                if key not in want:
                    raise AdapterError(
                        f"{where}: module {width}/{which} has {key}, which {_layout(opts)} does not have"
                    )
                t = sd[key]
                if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                    raise AdapterError(f"{where}: {width}/{which} {key} is not a float tensor")
                if tuple(t.shape) != tuple(want[key].shape):
                    raise AdapterError(
                        f"{where}: {width}/{which} {key} must have shape {list(want[key].shape)} but has {list(t.shape)}"
                    )
            m.load_state_dict({k: v.float() for k, v in sd.items()})
            m.eval().requires_grad_(False)
            built.append(m)
        modules[width] = (built[0], built[1])
    return modules


def _layout(opts: HypernetworkOptions) -> str:
    return (
        f"layer_structure={opts.layer_structure}, activation={opts.activation_func}, "
        f"layer_norm={opts.add_layer_norm}, dropout={opts.dropout_structure}"
    )


def save(folder: str | Path, hypernetwork: Hypernetwork, manifest) -> Path:
    """Our format: ``<width>.<k|v>.linear.<i>.weight`` in safetensors, options in the metadata and manifest."""
    from safetensors.torch import save_file

    from histolab.adapters.manifest import write_manifest

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {}
    for width, pair in hypernetwork.modules.items():
        for which, m in zip("kv", pair, strict=True):
            for k, v in m.state_dict().items():
                state[f"{width}.{which}.{k}"] = v.detach().contiguous().cpu()
    options = asdict(hypernetwork.options)
    out = folder / (manifest.weights or WEIGHTS_NAME)
    save_file(state, str(out), metadata={"hypernetwork_options": json.dumps(options, sort_keys=True)})
    manifest.weights = out.name
    manifest.config.update(options)
    write_manifest(folder, manifest)
    return out
