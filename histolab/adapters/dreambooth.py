"""DreamBooth (and any full fine-tune): weights that replace the base model's own.

Sources:

* a diffusers pipeline folder (``model_index.json``, ``unet/``, ``text_encoder/``, ``vae/``);
* a folder with ``unet/`` (and optionally ``text_encoder/``, ``vae/``) over the
  base, or a bare U-Net folder (``diffusion_pytorch_model.safetensors``);
* a single-file checkpoint in the LDM / SD-webui layout (``model.diffusion_model.*``,
  ``cond_stage_model.transformer.*``, ``first_stage_model.*``; safetensors or a
  weights-only ``.ckpt``), converted with diffusers' own converters against the
  loaded base's configs.

Every tensor must match the base model's name and shape (a fine-tune of the
same architecture). Strength ``s`` applies ``base + s * (tuned - base)``; at 1
the tuned tensors are used as they are. Applying points each parameter at new
storage and removing points it back at the original tensor.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from histolab.adapters.edit import ModelEdit
from histolab.adapters.kohya import te_path
from histolab.adapters.report import LoadReport
from histolab.errors import AdapterError

COMPONENTS = ("unet", "text_encoder", "vae")
LDM_UNET_PREFIX = "model.diffusion_model."
_LDM_PREFIXES = (LDM_UNET_PREFIX, "first_stage_model.", "cond_stage_model.transformer.")
# Buffers some checkpoints carry that recent transformers recompute (not in the state dict).
_IGNORED = {"text_model.embeddings.position_ids", "embeddings.position_ids"}


@dataclass
class DreamBooth:
    """Weights read lazily: shapes from the files' headers to validate, tensors on first apply."""

    sources: dict[str, list[Path]]  # component -> weight files; "single" -> [one LDM checkpoint]
    format: str  # "diffusers-pipeline", "diffusers-unet", "single-file"
    _raw: dict[str, dict[str, Any]] | None = field(default=None, repr=False)
    _shapes: dict[str, dict[str, Any]] | None = field(default=None, repr=False)
    _converted: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary, repr=False)
    _cast: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary, repr=False)
    _valid: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary, repr=False)

    kind = "dreambooth"

    @property
    def nbytes(self) -> int:
        return sum(t.element_size() * t.nelement() for sd in self._shape_state().values() for t in sd.values())

    def _shape_state(self) -> dict[str, dict[str, Any]]:
        """Meta tensors with each stored tensor's shape and dtype (nothing read but headers)."""
        if self._shapes is None:
            self._shapes = {c: _merge(shape_state(f) for f in files) for c, files in self.sources.items()}
        return self._shapes

    def _real_state(self) -> dict[str, dict[str, Any]]:
        if self._raw is None:
            from histolab.files import load_state_dict

            raw = {}
            for comp, files in self.sources.items():
                parts = []
                for f in files:
                    tensors, _ = load_state_dict(f)
                    parts.append(unwrap_checkpoint(tensors))
                raw[comp] = _merge(parts)
            self._raw = raw
        return self._raw

    def state_for(self, model, real: bool) -> dict[str, dict[str, Any]]:
        src = self._real_state() if real else self._shape_state()
        got = self._converted.get(model.unet)
        if got is None or got[0] is not src:
            comps = convert_single_file(src["single"], model) if "single" in src else dict(src)
            got = (src, _spell_text_encoder(comps, model))
            self._converted[model.unet] = got
        return got[1]

    def validate(self, model, name: str = "DreamBooth", real: bool = False) -> dict[str, dict[str, Any]]:
        comps = self.state_for(model, real)
        if self._valid.get(model.unet) is comps:
            return comps
        if "unet" not in comps and "text_encoder" not in comps:
            raise AdapterError(f"{name}: holds neither U-Net nor text-encoder weights")
        for comp, sd in comps.items():
            module = getattr(model, comp, None)
            if module is None:
                continue  # e.g. a shape-only base without a VAE
            want = module.state_dict()
            unexpected = [k for k in sd if k not in want and k not in _IGNORED]
            if unexpected:
                raise AdapterError(
                    f"{name}: {comp} has {len(unexpected)} tensors the base model does not have, e.g. {unexpected[0]} "
                    "(a different architecture: is it SDXL or SD 2?)"
                )
            missing = [k for k in want if k not in sd]
            if missing:
                raise AdapterError(
                    f"{name}: {comp} lacks {len(missing)} of the base model's {len(want)} tensors, e.g. {missing[0]}; "
                    "a DreamBooth checkpoint holds complete components"
                )
            for k, t in sd.items():
                if k in _IGNORED:
                    continue
                if tuple(t.shape) != tuple(want[k].shape):
                    raise AdapterError(
                        f"{name}: {comp}.{k} must have shape {list(want[k].shape)} (the base model's) "
                        f"but has {list(t.shape)}"
                    )
                if not t.is_floating_point() and want[k].is_floating_point():
                    raise AdapterError(f"{name}: {comp}.{k} has dtype {t.dtype}; expected floating point weights")
        self._valid[model.unet] = comps
        return comps

    def load_report(self, model, name: str = "DreamBooth") -> LoadReport:
        comps = self.validate(model, name)
        what = {
            "single-file": "single-file checkpoint (LDM layout)",
            "diffusers-pipeline": "diffusers pipeline folder",
            "diffusers-unet": "diffusers U-Net folder",
        }.get(self.format, self.format)

        def modules(comp: str) -> int:
            return len({k.rpartition(".")[0] for k in comps.get(comp, {}) if k not in _IGNORED})

        rep = LoadReport(name, what, unet_modules=modules("unet"), text_encoder_modules=modules("text_encoder"))
        if "vae" in comps:
            rep.notes.append(f"VAE {modules('vae')} modules")
        if "single" in self.sources:
            raw = self._shape_state()["single"]
            rep.ignored = sorted(k for k in raw if not k.startswith(_LDM_PREFIXES) or k.endswith("position_ids"))
            if any(k.startswith("model_ema.") for k in raw):
                rep.notes.append(
                    "EMA weights (model_ema.*) present and not used: the trained weights are loaded, "
                    "as diffusers' from_single_file does by default"
                )
        return rep

    def prepare(self, model, name: str = "DreamBooth") -> None:
        """Read the tensors (checked finite by histolab.files) before anything is applied."""
        self.validate(model, name, real=True)

    def apply(self, model, strength: float, edit: ModelEdit, name: str = "DreamBooth") -> None:
        import torch

        comps = self.validate(model, name, real=True)
        if strength == 0:
            return
        with torch.no_grad():
            for p, tuned in self._cast_for(model, comps):
                if strength == 1 or not p.is_floating_point():
                    new = tuned
                else:
                    base = p.data
                    new = (base.float() + strength * (tuned.float() - base.float())).to(base.dtype)
                edit.swap_data(p, new)

    def _cast_for(self, model, comps) -> list[tuple[Any, Any]]:
        """(base parameter or buffer, tuned tensor in the model's dtype and device), cached per model."""
        import torch

        key = (str(model.device), model.dtype)
        got = self._cast.get(model.unet)
        if got is None or got[0] != key or got[1] is not comps:
            cast = []
            with torch.no_grad():
                for comp, sd in comps.items():
                    module = getattr(model, comp, None)
                    if module is None:
                        continue
                    targets = dict(module.named_parameters())
                    targets.update(dict(module.named_buffers()))
                    for k, t in sd.items():
                        if k not in _IGNORED:
                            cast.append(
                                (targets[k], t.to(model.device, model.dtype if t.is_floating_point() else t.dtype))
                            )
            got = (key, comps, cast)
            self._cast[model.unet] = got
        return got[2]


def _spell_text_encoder(comps: dict[str, dict[str, Any]], model) -> dict[str, dict[str, Any]]:
    """Text-encoder tensors named as this base's text encoder names them.

    Files saved with transformers 4 (and diffusers' LDM converter) say ``text_model.encoder...``;
    transformers 5 flattened CLIPTextModel to ``encoder...``. Both are the same tensors.
    """
    te = getattr(model, "text_encoder", None)
    if te is None or "text_encoder" not in comps:
        return comps
    return {**comps, "text_encoder": {te_path(te, k): v for k, v in comps["text_encoder"].items()}}


def _merge(parts) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p in parts:
        out.update(p)
    return out


_ST_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def shape_state(path: Path) -> dict[str, Any]:
    """{name: meta tensor} for a weights file, reading only its header (safetensors) or mapping it (torch zip)."""
    import torch

    from histolab.files import safetensors_header, sniff

    kind = sniff(path)
    if kind == "safetensors":
        out = {}
        for k, info in safetensors_header(path).items():
            if k == "__metadata__":
                continue
            dtype = getattr(torch, _ST_DTYPES.get(str(info.get("dtype")), ""), None)
            if dtype is None:
                raise AdapterError(f"{path.name}: tensor {k} has dtype {info.get('dtype')!r}, which is not loaded")
            out[k] = torch.empty(info.get("shape", []), dtype=dtype, device="meta")
        return unwrap_checkpoint(out)
    if kind == "torch-zip":
        from histolab.errors import UnsafeFile
        from histolab.files import load_torch_file

        try:
            obj = load_torch_file(path, mmap=True)
        except UnsafeFile as exc:
            raise AdapterError(str(exc)) from exc
        obj = unwrap_checkpoint(obj) if isinstance(obj, dict) else obj
        if not isinstance(obj, dict):
            raise AdapterError(f"{path.name}: not a state dict")
        return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in obj.items() if hasattr(v, "shape")}
    from histolab.files import load_state_dict

    tensors, _ = load_state_dict(path)  # legacy pickles and anything else: full (safe) load, or its error
    return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in unwrap_checkpoint(tensors).items()}


def is_single_file(tensors: dict) -> bool:
    return any(isinstance(k, str) and k.startswith(LDM_UNET_PREFIX) for k in tensors)


def unwrap_checkpoint(obj: dict) -> dict:
    """SD-webui ``.ckpt`` files keep the weights under ``state_dict`` (with ``global_step`` beside it)."""
    inner = obj.get("state_dict")
    return inner if isinstance(inner, dict) else obj


def convert_single_file(ldm: dict, model) -> dict[str, dict[str, Any]]:
    """LDM names -> diffusers names, for this base's U-Net/VAE configs (diffusers' converters)."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    out: dict[str, dict[str, Any]] = {}
    try:
        out["unet"] = convert_ldm_unet_checkpoint(ldm, dict(model.unet.config))
        if any(k.startswith("cond_stage_model.transformer.") for k in ldm):
            te = convert_ldm_clip_checkpoint(ldm)
            # The converter names tensors as transformers 4 does (text_model.*); the base may be flat (transformers 5).
            out["text_encoder"] = {k: v for k, v in te.items() if k not in _IGNORED}
        if getattr(model, "vae", None) is not None and any(k.startswith("first_stage_model.") for k in ldm):
            out["vae"] = convert_ldm_vae_checkpoint(ldm, dict(model.vae.config))
    except (KeyError, IndexError, ValueError, RuntimeError) as exc:
        raise AdapterError(
            f"the single-file checkpoint does not convert to this base model's layout ({type(exc).__name__}: {exc}); "
            "is it for another architecture (SDXL, SD 2)?"
        ) from exc
    return out


def component_files(folder: Path) -> list[Path]:
    """The weight files of one diffusers component folder, preferring full-precision safetensors."""
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
        if (folder / name).is_file():
            return [folder / name]
    shards = sorted(p for p in folder.glob("*.safetensors") if "-of-" in p.name)
    if shards:
        return shards
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    plain = [p for p in files if p.name.count(".") == 1]
    return plain or files[:1]


def component_dirs(folder: Path) -> dict[str, Path]:
    """Which components a DreamBooth folder holds: {"unet": folder/unet, ...} or a bare U-Net folder."""
    found = {c: folder / c for c in COMPONENTS if (folder / c).is_dir() and component_files(folder / c)}
    if not found and component_files(folder) and (folder / "config.json").is_file():
        found = {"unet": folder}
    return found


def save(folder: str | Path, manifest, unet=None, text_encoder=None) -> Path:
    """Our format: a folder with ``unet/`` (and ``text_encoder/``) saved by diffusers/transformers, plus the manifest."""
    from histolab.adapters.manifest import write_manifest

    folder = Path(folder)
    if unet is None and text_encoder is None:
        raise AdapterError("a DreamBooth adapter needs a fine-tuned U-Net or text encoder to save")
    if unet is not None:
        unet.save_pretrained(folder / "unet", safe_serialization=True)
    if text_encoder is not None:
        text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    write_manifest(folder, manifest)
    return folder
