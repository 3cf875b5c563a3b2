"""Open an adapter folder or file and decide what it is from its content.

A folder's ``manifest.json`` names the kind and the weights; without one the
folder's files are recognised (a diffusers pipeline or U-Net folder is a
DreamBooth, ``pytorch_lora_weights.*`` a LoRA, ``learned_embeds.*`` a textual
inversion). A single file is opened through ``histolab.files`` (format by its
first bytes; safetensors, or pickles with ``weights_only=True`` only) and its
keys say which kind it is.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from histolab.adapters import dreambooth, hypernetwork, lora, projector, textual_inversion
from histolab.adapters.manifest import MANIFEST_NAME, Manifest, read_manifest
from histolab.errors import AdapterError, HistolabError, ModelNotFound
from histolab.files import sha256_file

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".bin", ".ckpt", ".pth")
_KNOWN_FILES = {
    "pytorch_lora_weights.safetensors": "lora",
    "pytorch_lora_weights.bin": "lora",
    "adapter_model.safetensors": "lora",
    "learned_embeds.safetensors": "textual_inversion",
    "learned_embeds.bin": "textual_inversion",
}
_DEFAULT_WEIGHTS = {
    "lora": lora.WEIGHTS_NAME,
    "textual_inversion": textual_inversion.WEIGHTS_NAME,
    "hypernetwork": hypernetwork.WEIGHTS_NAME,
    "projector": projector.WEIGHTS_NAME,
}


@dataclass
class LoadedAdapter:
    name: str
    kind: str
    path: Path  # the folder or file it was opened from
    hash: str  # sha256 of its weights (combined over files for a folder)
    format: str
    manifest: Manifest | None
    payload: Any


@dataclass(frozen=True)
class Located:
    """Where an adapter's weights are, before reading them."""

    path: Path
    kind: str | None  # None: decide from the file's keys
    files: tuple[Path, ...]
    manifest: Manifest | None

    def content_hash(self) -> str:
        if len(self.files) == 1:
            return sha256_file(self.files[0])
        h = hashlib.sha256()
        for f in self.files:
            h.update(f.relative_to(self.path).as_posix().encode() + b"\0" + sha256_file(f).encode())
        return h.hexdigest()

    def cache_key(self) -> tuple[str, str]:
        manifest = self.manifest.to_json() if self.manifest else ""
        return self.content_hash(), hashlib.sha256(manifest.encode()).hexdigest()


def locate(path: Path) -> Located:
    """Find the weights of the adapter at ``path`` (a folder or a file) without reading them."""
    if path.is_file():
        manifest = read_manifest(path.parent)
        if manifest is not None and manifest.weights and manifest.weights != path.name:
            manifest = None  # the folder's manifest describes another file
        return Located(path, manifest.kind if manifest else None, (path,), manifest)
    if not path.is_dir():
        raise ModelNotFound(f"no adapter at {path}")
    manifest = read_manifest(path)
    kind = manifest.kind if manifest else None
    if kind == "dreambooth" or (kind is None and _looks_like_dreambooth(path)):
        dirs = dreambooth.component_dirs(path)
        if not dirs:
            single = _weight_files(path)
            if kind == "dreambooth" and len(single) == 1:
                return Located(path, "dreambooth", tuple(single), manifest)
            raise AdapterError(f"{path}: a DreamBooth folder needs unet/ (and optionally text_encoder/, vae/) weights")
        files = tuple(f for c in sorted(dirs) for f in dreambooth.component_files(dirs[c]))
        return Located(path, "dreambooth", files, manifest)
    if manifest is not None:
        name = manifest.weights or _DEFAULT_WEIGHTS.get(kind, "")
        f = path / name
        if not name or not f.is_file():
            raise ModelNotFound(f"{path / MANIFEST_NAME} names weights {name!r}, which is not in {path}")
        _inside(path, f)
        return Located(path, kind, (f,), manifest)
    for fname, k in _KNOWN_FILES.items():
        if (path / fname).is_file():
            return Located(path, k, (path / fname,), None)
    files = _weight_files(path)
    if len(files) == 1:
        return Located(path, None, (files[0],), None)
    if not files:
        raise AdapterError(f"{path}: no manifest.json and no weights file (.safetensors, .pt, .bin, .ckpt)")
    raise AdapterError(
        f"{path}: several weight files ({', '.join(f.name for f in files[:4])}) and no manifest.json saying which "
        "to use; add a manifest.json with `kind` and `weights`, or point at one file"
    )


def _inside(folder: Path, f: Path) -> None:
    if folder.resolve() not in f.resolve().parents:
        raise AdapterError(f"{folder / MANIFEST_NAME}: `weights` must name a file inside the folder, not {f}")


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def _looks_like_dreambooth(folder: Path) -> bool:
    return (
        (folder / "model_index.json").is_file()
        or (folder / "unet").is_dir()
        or ((folder / "config.json").is_file() and any(folder.glob("diffusion_pytorch_model*")))
    )


def open_located(loc: Located, payload: Any = None) -> LoadedAdapter:
    """Read and parse the weights (no base model needed); AdapterError/UnsafeFile if they are not an adapter.

    ``payload``: weights already parsed from the same content (the runtime's cache); only names are filled in.
    """
    from histolab.files import load_state_dict

    manifest = loc.manifest
    name = (manifest.name if manifest and manifest.name else "") or _default_name(loc.path)
    where = f"adapter {name!r} ({loc.files[0].name})"
    digest = loc.content_hash()
    if payload is not None:
        return LoadedAdapter(name, payload.kind, loc.path, digest, payload.format, manifest, payload)
    if loc.kind == "dreambooth":
        payload = _open_dreambooth(loc)
        return LoadedAdapter(name, "dreambooth", loc.path, digest, payload.format, manifest, payload)

    f = loc.files[0]
    if loc.kind is None:
        from histolab.files import sniff

        if sniff(f) == "safetensors" and dreambooth.is_single_file(dreambooth.shape_state(f)):
            payload = dreambooth.DreamBooth({"single": [f]}, "single-file")
            return LoadedAdapter(name, "dreambooth", loc.path, digest, payload.format, manifest, payload)
    tensors, meta = load_state_dict(f)
    tensors = dreambooth.unwrap_checkpoint(tensors)
    kind = loc.kind or classify(tensors, where)
    config = manifest.config if manifest else {}
    if kind == "dreambooth":
        payload = dreambooth.DreamBooth({"single": [f]}, "single-file")
    elif kind == "lora":
        payload = lora.from_state(tensors, meta, config, where, peft_config=_peft_config(f, where))
    elif kind == "textual_inversion":
        sdwebui = "string_to_param" in tensors or "emb_params" in tensors
        token = (manifest.trigger_token if manifest else "") or (f.stem if sdwebui else "")
        payload = textual_inversion.from_state(tensors, token, where)
    elif kind == "hypernetwork":
        if hypernetwork.is_our_state(tensors):
            import json

            options = dict(config)
            if not options and meta.get("hypernetwork_options"):
                options = json.loads(meta["hypernetwork_options"])
            payload = hypernetwork.from_ours(tensors, options, where)
        else:
            payload = hypernetwork.from_sdwebui(tensors, where)
    elif kind == "projector":
        payload = projector.from_state(tensors, meta, manifest, where)
    else:
        raise AdapterError(f"{where}: unknown kind {kind!r}")
    return LoadedAdapter(name, kind, loc.path, digest, payload.format, manifest, payload)


def _peft_config(weights: Path, where: str) -> dict | None:
    """A peft folder's adapter_config.json (its lora_alpha and alpha_pattern), beside adapter_model.*."""
    import json

    cfg = weights.parent / "adapter_config.json"
    if not weights.name.startswith("adapter_model.") or not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{where}: adapter_config.json cannot be read ({exc})") from exc
    if not isinstance(data, dict):
        raise AdapterError(f"{where}: adapter_config.json is not a JSON object")
    if data.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{where}: a peft {data.get('peft_type')} adapter; histolab loads peft LoRA adapters")
    return data


def _default_name(path: Path) -> str:
    """The folder's name for a folder, or for a file with a tool's generic name; else the file's stem."""
    if path.is_dir():
        return path.name
    generic = path.name in _KNOWN_FILES or path.stem in ("diffusion_pytorch_model", "model")
    return path.parent.name if generic else path.stem


def _open_dreambooth(loc: Located) -> dreambooth.DreamBooth:
    single = len(loc.files) == 1 and loc.files[0].parent == loc.path
    if single and not (loc.path / "config.json").is_file():
        return dreambooth.DreamBooth({"single": [loc.files[0]]}, "single-file")
    dirs = dreambooth.component_dirs(loc.path)
    sources = {c: dreambooth.component_files(d) for c, d in dirs.items()}
    fmt = "diffusers-pipeline" if (loc.path / "model_index.json").is_file() else "diffusers-unet"
    return dreambooth.DreamBooth(sources, fmt)


def classify(tensors: dict, where: str) -> str:
    """The adapter kind a state dict's keys say it is."""
    if dreambooth.is_single_file(tensors):
        return "dreambooth"
    if projector.is_projector_state(tensors):
        return "projector"
    if hypernetwork.is_sdwebui_state(tensors) or hypernetwork.is_our_state(tensors):
        return "hypernetwork"
    if lora.is_lora_state(tensors):
        return "lora"
    if textual_inversion.is_ti_state(tensors):
        return "textual_inversion"
    sample = ", ".join(str(k) for k in list(tensors)[:3])
    raise AdapterError(
        f"{where}: cannot tell what kind of adapter this is from its keys (e.g. {sample}); "
        "add a manifest.json with its `kind`"
    )


# ------------------------------------------------------------------ finding files
# Here rather than in registry.py: the runtime resolves names through them, and the
# registry (which lists entries through the runtime) sits above both.


def candidates(root: Path) -> list[Path]:
    """Top-level folders and weight files in checkpoints/ (hidden entries skipped)."""
    if not root.is_dir():
        return []
    out = []
    for p in sorted(root.iterdir()):
        if p.name.startswith((".", "_")):
            continue
        if p.is_dir() or (p.is_file() and p.suffix in WEIGHT_SUFFIXES):
            out.append(p)
    return out


def find_by_name(root: Path, name: str) -> Path | None:
    """The folder whose manifest.json has ``name``."""
    for p in candidates(root):
        if p.is_dir() and (p / MANIFEST_NAME).is_file():
            try:
                m = read_manifest(p)
            except HistolabError:
                continue
            if m is not None and m.name == name:
                return p
    return None
