"""HyperNetworks as SD-webui trains them: residual MLPs on the key and value contexts of attention.

The modules are histolab.adapters.hypernetwork's ``HypernetworkModule`` (laid
out exactly as SD-webui builds them: Linear, activation, LayerNorm, Dropout
per stage), initialised the way SD-webui initialises them, and applied through
the same attention processor that loading uses. Saved in our safetensors form
and, with ``export_sdwebui``, also as SD-webui's ``.pt`` (``{width: (k, v)}``
state dicts plus its option keys), which SD-webui loads as a hypernetwork.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch

from histolab.training.trainer import Trainer, TrainNet, eps_loss


def sdwebui_init(module, weight_init: str, activation: str) -> None:
    """SD-webui's initialisation of a new hypernetwork module (Linear and LayerNorm weights)."""
    for layer in module.linear:
        if not isinstance(layer, torch.nn.Linear | torch.nn.LayerNorm):
            continue
        w, b = layer.weight.data, layer.bias.data
        if weight_init == "Normal" or isinstance(layer, torch.nn.LayerNorm):
            torch.nn.init.normal_(w, mean=0.0, std=0.01)
            torch.nn.init.zeros_(b)
        elif weight_init == "XavierUniform":
            torch.nn.init.xavier_uniform_(w)
            torch.nn.init.zeros_(b)
        elif weight_init == "XavierNormal":
            torch.nn.init.xavier_normal_(w)
            torch.nn.init.zeros_(b)
        else:
            fn = torch.nn.init.kaiming_uniform_ if weight_init == "KaimingUniform" else torch.nn.init.kaiming_normal_
            fn(w, nonlinearity="leaky_relu" if activation == "leakyrelu" else "relu")
            torch.nn.init.zeros_(b)


class HypernetworkNet(TrainNet):
    frozen = ("unet",)

    def __init__(self, unet, modules: torch.nn.ModuleDict, scheduler):
        super().__init__()
        self.unet = unet
        self.hypernetwork = modules  # trains (its dropout, if any, is active in train mode)
        self.scheduler = scheduler

    def forward(self, batch):
        return eps_loss(
            self.unet, self.scheduler, batch["latents"], batch["noise"], batch["timesteps"], batch["cond"]
        ).mean()


class HypernetworkTrainer(Trainer):
    kind = "hypernetwork"

    def options(self):
        from histolab.adapters.hypernetwork import HypernetworkOptions

        cfg = self.cfg
        return HypernetworkOptions(
            layer_structure=[float(x) for x in cfg.layer_structure],
            activation_func=cfg.activation_func,
            add_layer_norm=cfg.add_layer_norm,
            activate_output=cfg.activate_output,
            dropout_structure=[float(x) for x in cfg.dropout_structure] if cfg.dropout_structure else None,
            weight_initialization=cfg.weight_init,
        )

    def prepare(self) -> None:
        from histolab.adapters.hypernetwork import HypernetworkAttnProcessor, HypernetworkModule

        cfg, model = self.cfg, self.model
        self.cache_training_latents()
        self.cache_text(self.all_prompts())
        self.offload("vae", "text_encoder")
        self.cast_frozen("unet")
        widths = {}
        for proc in model.unet.attn_processors:
            attn = model.unet.get_submodule(proc.removesuffix(".processor"))
            widths[proc] = int(attn.cross_attention_dim)
        wanted = sorted(set(widths.values())) if cfg.sizes == "all" else [int(model.unet.config.cross_attention_dim)]
        opts = self.options()
        torch.manual_seed(cfg.seed)
        self.modules = {}
        for w in wanted:
            pair = (HypernetworkModule(w, opts), HypernetworkModule(w, opts))
            for m in pair:
                sdwebui_init(m, cfg.weight_init, cfg.activation_func)
                m.to(self.device).train().requires_grad_(True)
            self.modules[w] = pair
        self.module_dict = torch.nn.ModuleDict(
            {f"{w}_{kv}": m for w, pair in self.modules.items() for kv, m in zip("kv", pair, strict=True)}
        )
        self._previous = dict(model.unet.attn_processors)
        procs = dict(self._previous)
        for proc, w in widths.items():
            if w in self.modules:
                procs[proc] = HypernetworkAttnProcessor([(*self.modules[w], 1.0)])
        model.unet.set_attn_processor(procs)
        if cfg.gradient_checkpointing:
            model.unet.enable_gradient_checkpointing()

    def network(self) -> HypernetworkNet:
        return HypernetworkNet(self.model.unet, self.module_dict, self.noise_scheduler)

    def trainable_named(self):
        return dict(self.module_dict.named_parameters())

    def param_groups(self):
        return [
            {
                "name": "hypernetwork",
                "params": list(self.module_dict.parameters()),
                "lr": self.cfg.lr,
                "weight_decay": self.cfg.weight_decay,
            }
        ]

    def batch(self, idx, gen):
        latents = self.draw_latents(idx, gen)
        noise, timesteps = self.draw_noise(latents, gen)
        return {
            "latents": latents,
            "noise": noise,
            "timesteps": timesteps,
            "cond": self.cached_text(self.prompts_for(idx, gen)),
        }

    def frozen_copy(self):
        """A histolab.adapters Hypernetwork with CPU float32 copies of the trained modules."""
        from histolab.adapters.hypernetwork import Hypernetwork, HypernetworkModule

        opts = self.options()
        mods = {}
        for w, pair in self.modules.items():
            copies = []
            for m in pair:
                c = HypernetworkModule(w, opts)
                c.load_state_dict({k: v.detach().float().cpu() for k, v in m.state_dict().items()})
                copies.append(c.eval().requires_grad_(False))
            mods[w] = tuple(copies)
        return Hypernetwork(opts, mods, "histolab")

    def save_adapter(self, folder: Path, manifest) -> None:
        from histolab.adapters import hypernetwork

        hn = self.frozen_copy()
        manifest.config.update({"sizes": sorted(self.modules)})
        hypernetwork.save(folder, hn, manifest)
        if self.cfg.export_sdwebui:
            name = getattr(self, "run_name", "") or manifest.name or folder.name
            export_sdwebui(
                folder / f"{name}.pt",
                hn,
                name=name,
                step=int(manifest.training.get("step", 0)),
                base_name=manifest.base.get("name", ""),
                base_hash=manifest.base.get("hash", ""),
            )

    def close(self) -> None:
        self.model.unet.set_attn_processor(dict(self._previous))


def export_sdwebui(path: Path, hn, *, name: str, step: int, base_name: str = "", base_hash: str = "") -> Path:
    """SD-webui's hypernetwork file: ``torch.save`` of {width: (k_state, v_state)} and its option keys.

    Only plain containers, strings, numbers and tensors, so it also opens with ``weights_only=True``
    (SD-webui's own safe unpickler accepts the same).
    """
    opts = hn.options
    ds = list(opts.dropout_structure) if opts.dropout_structure else [0.0] * len(opts.layer_structure)
    obj: dict = {}
    for w, (k, v) in hn.modules.items():
        obj[int(w)] = (
            OrderedDict((n, t.detach().float().cpu().contiguous()) for n, t in k.state_dict().items()),
            OrderedDict((n, t.detach().float().cpu().contiguous()) for n, t in v.state_dict().items()),
        )
    obj.update(
        step=int(step),
        name=name,
        layer_structure=[float(x) for x in opts.layer_structure],
        activation_func=opts.activation_func or "linear",
        is_layer_norm=bool(opts.add_layer_norm),
        weight_initialization=opts.weight_initialization,
        sd_checkpoint=base_hash[:10] if base_hash else None,
        sd_checkpoint_name=base_name or None,
        activate_output=bool(opts.activate_output),
        use_dropout=any(x > 0 for x in ds),
        dropout_structure=ds,
        last_layer_dropout=len(ds) >= 2 and ds[-2] != 0,
        optional_info=None,
    )
    from histolab.training.state import atomic_write

    atomic_write(path, lambda tmp: torch.save(obj, tmp))
    return path
