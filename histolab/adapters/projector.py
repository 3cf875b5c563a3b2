"""Foundation-embedding adapter (Kuzmin & Berezsky 2026): generation from a reference patch.

A pathology foundation encoder (UNI2-h, UNI, or the embedded default) turns
the reference patch into one embedding; an MLP projector turns it into
``n_tokens`` conditioning tokens of the U-Net's cross-attention width, which
take the place of the text encoder's output (``prompt_embeds``). A learned
null embedding, in encoder space and projected like any embedding, is the
unconditional branch of classifier-free guidance. LoRA on ``to_q``, ``to_k``,
``to_v`` and ``to_out.0`` of every U-Net attention layer (self and cross)
lets the U-Net read the new tokens.

Saved as one safetensors file: ``projector.*`` (the MLP), ``null_embedding``,
``lora.unet.<module>.lora_A/B.weight``; the config and encoder in its metadata
and in ``manifest.json``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from histolab.adapters import lora as lora_mod
from histolab.adapters.edit import ModelEdit
from histolab.adapters.reference import ReferenceConditioner
from histolab.errors import AdapterError

WEIGHTS_NAME = "projector.safetensors"
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass
class ProjectorConfig:
    encoder_dim: int = 1536  # UNI2-h's embedding width
    cross_attention_dim: int = 768  # SD 1.5's text-token width; set from the base model
    n_tokens: int = 4  # a handful of tokens carries one global embedding; 77 would mostly repeat it
    depth: int = 2  # linear layers; two is the paper's default
    hidden: int = 1024  # hidden width of the MLP
    rank: int = 8  # LoRA rank on the attention projections (4-8 in the paper)
    alpha: float = 8.0  # alpha = rank: LoRA scale 1

    def check(self, where: str = "projector") -> None:
        for name in ("encoder_dim", "cross_attention_dim", "n_tokens", "depth", "hidden", "rank"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise AdapterError(f"{where}: `{name}` must be a positive integer but is {v!r}")
        if self.n_tokens > 75:
            raise AdapterError(f"{where}: `n_tokens` must be at most 75 but is {self.n_tokens}")


class Projector(torch.nn.Module):
    """Encoder embedding (B, encoder_dim) -> conditioning tokens (B, n_tokens, cross_attention_dim).

    ``depth - 1`` blocks of Linear -> LayerNorm -> SiLU, then a Linear to all tokens at once.
    """

    def __init__(self, cfg: ProjectorConfig):
        super().__init__()
        self.cfg = cfg
        layers: list[torch.nn.Module] = []
        width = cfg.encoder_dim
        for _ in range(cfg.depth - 1):
            layers += [torch.nn.Linear(width, cfg.hidden), torch.nn.LayerNorm(cfg.hidden), torch.nn.SiLU()]
            width = cfg.hidden
        layers.append(torch.nn.Linear(width, cfg.n_tokens * cfg.cross_attention_dim))
        self.net = torch.nn.Sequential(*layers)

    def forward(self, embedding):
        return self.net(embedding).view(embedding.shape[0], self.cfg.n_tokens, self.cfg.cross_attention_dim)


def projector_parameter_count(cfg: ProjectorConfig) -> int:
    """Trainable parameters of the projector group as the 2026 paper's Table 2 counts them: the MLP and the
    null embedding (``encoder_dim`` values in encoder space, projected like any embedding). For UNI2-h,
    depth 2, width 1024, 4 tokens of 768: 4,724,736 in the MLP + 1,536 = 4,726,272."""
    mlp = sum(p.numel() for p in Projector(cfg).parameters())
    return mlp + cfg.encoder_dim


def attention_lora_modules(unet) -> list[str]:
    """``to_q``/``to_k``/``to_v``/``to_out.0`` of every attention layer of the U-Net (self and cross)."""
    out = []
    for proc_name in unet.attn_processors:
        attn = proc_name.removesuffix(".processor")
        out += [f"{attn}.{t}" for t in LORA_TARGETS]
    return out


@dataclass
class ProjectorAdapter:
    config: ProjectorConfig
    projector: Projector  # float32, CPU, eval
    null_embedding: Any  # (encoder_dim,) float32
    lora: lora_mod.LoraWeights | None
    encoder: dict[str, Any]  # {"name", "weights_hash", "dim"}
    format: str = "histolab"
    _null_tokens: dict = field(default_factory=dict, repr=False)

    kind = "projector"

    @property
    def nbytes(self) -> int:
        own = sum(p.numel() * p.element_size() for p in self.projector.parameters())
        return own + self.null_embedding.numel() * 4 + (self.lora.nbytes if self.lora else 0)

    def validate(self, model, name: str = "projector") -> None:
        if self.config.cross_attention_dim != model.cross_attention_dim:
            raise AdapterError(
                f"{name}: the projector makes tokens of width {self.config.cross_attention_dim}, but the base U-Net's "
                f"cross-attention width is {model.cross_attention_dim}: it was trained for another base model"
            )
        if self.lora is not None:
            self.lora.validate(model, name)

    def apply(self, model, strength: float, edit: ModelEdit, name: str = "projector", runtime=None) -> None:
        self.validate(model, name)
        conditioner = ReferenceConditioner(self, runtime, name)  # refuses a missing runtime before any edit
        if self.lora is not None:
            self.lora.apply(model, strength, edit, name)
        if "reference" in model.conditioners:
            raise AdapterError(
                f"{name}: another reference-mode adapter is already applied; use one projector at a time"
            )
        edit.set_item(model.conditioners, "reference", conditioner)

    @torch.no_grad()
    def project(self, embeddings, model):
        """(B, encoder_dim) -> (B, n_tokens, width) in the model's dtype and device (computed in float32)."""
        return self.projector(embeddings.float().cpu()).to(model.device, model.dtype)

    def null_tokens(self, model):
        key = (str(model.device), model.dtype)
        if key not in self._null_tokens:
            self._null_tokens[key] = self.project(self.null_embedding[None], model)
        return self._null_tokens[key]


# ------------------------------------------------------------------ parsing


def is_projector_state(tensors: dict) -> bool:
    return "null_embedding" in tensors and any(isinstance(k, str) and k.startswith("projector.") for k in tensors)


def from_state(tensors: dict, metadata: dict, manifest, where: str) -> ProjectorAdapter:
    cfg_dict: dict[str, Any] = {}
    if metadata.get("projector_config"):
        try:
            cfg_dict = json.loads(metadata["projector_config"])
        except json.JSONDecodeError as exc:
            raise AdapterError(f"{where}: projector_config metadata is not valid JSON ({exc})") from exc
    if manifest is not None:
        cfg_dict.update({k: v for k, v in manifest.config.items() if k in ProjectorConfig.__dataclass_fields__})
    unknown = set(cfg_dict) - set(ProjectorConfig.__dataclass_fields__)
    if unknown:
        raise AdapterError(f"{where}: unknown projector settings {sorted(unknown)}")
    cfg = ProjectorConfig(**cfg_dict)
    cfg.check(where)
    encoder = dict(manifest.encoder) if manifest is not None and manifest.encoder else {}
    if not encoder and metadata.get("encoder"):
        encoder = json.loads(metadata["encoder"])
    if not encoder.get("name"):
        raise AdapterError(f"{where}: the projector does not say which image encoder it was trained with")

    proj = Projector(cfg)
    want = proj.state_dict()
    got = {k.removeprefix("projector."): v for k, v in tensors.items() if k.startswith("projector.")}
    for key in sorted(set(want) | set(got)):
        if key not in got:
            raise AdapterError(f"{where}: projector.{key} is missing (config: depth {cfg.depth}, hidden {cfg.hidden})")
        if key not in want:
            raise AdapterError(f"{where}: projector.{key} is not part of a depth-{cfg.depth} projector")
        if tuple(got[key].shape) != tuple(want[key].shape):
            raise AdapterError(
                f"{where}: projector.{key} must have shape {list(want[key].shape)} but has {list(got[key].shape)}"
            )
    proj.load_state_dict({k: v.float() for k, v in got.items()})
    proj.eval().requires_grad_(False)
    null = tensors["null_embedding"]
    if tuple(null.shape) != (cfg.encoder_dim,):
        raise AdapterError(f"{where}: null_embedding must have shape [{cfg.encoder_dim}] but has {list(null.shape)}")
    if encoder.get("dim") not in (None, cfg.encoder_dim):
        raise AdapterError(f"{where}: encoder width {encoder['dim']} differs from the projector's {cfg.encoder_dim}")
    lora_state = {k.removeprefix("lora."): v for k, v in tensors.items() if k.startswith("lora.")}
    other = [k for k in tensors if not k.startswith(("projector.", "lora.")) and k != "null_embedding"]
    if other:
        raise AdapterError(f"{where}: unexpected tensor {other[0]} in a projector file")
    lora = lora_mod.from_state(lora_state, {}, {"alpha": cfg.alpha}, where) if lora_state else None
    return ProjectorAdapter(cfg, proj, null.float().contiguous(), lora, encoder)


def save(
    folder: str | Path,
    projector: Projector,
    null_embedding,
    lora_layers: list[tuple[str, Any, Any]],
    encoder: dict[str, Any],
    manifest,
) -> Path:
    """Write our format. ``lora_layers``: (U-Net module path, down, up); ``encoder``: name, weights_hash, dim."""
    from safetensors.torch import save_file

    from histolab.adapters.manifest import write_manifest

    cfg = projector.cfg
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {f"projector.{k}": v.detach().contiguous().cpu() for k, v in projector.state_dict().items()}
    state["null_embedding"] = null_embedding.detach().float().contiguous().cpu()
    for path, down, up in lora_layers:
        state[f"lora.unet.{path}.lora_A.weight"] = down.detach().contiguous().cpu()
        state[f"lora.unet.{path}.lora_B.weight"] = up.detach().contiguous().cpu()
    out = folder / (manifest.weights or WEIGHTS_NAME)
    meta = {"projector_config": json.dumps(asdict(cfg), sort_keys=True), "encoder": json.dumps(encoder, sort_keys=True)}
    save_file(state, str(out), metadata=meta)
    manifest.weights = out.name
    manifest.encoder = dict(encoder)
    manifest.config.update(asdict(cfg))
    write_manifest(folder, manifest)
    return out
