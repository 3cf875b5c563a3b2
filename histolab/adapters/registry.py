"""What is in ``checkpoints/``: every adapter, its kind, the base it was made
for, and whether it fits a given base model (and if not, why not).

Fitting is decided the same way as before applying: the adapter's tensors are
matched to the base model's modules by name and shape. That needs only the
base's shapes, so the check also runs against a meta-device copy of a base
built from its config files, without reading its weights (``shape_model``).
"""

from __future__ import annotations

import json
from pathlib import Path

from histolab.adapters.entry import Entry
from histolab.adapters.loader import candidates
from histolab.adapters.manifest import MANIFEST_NAME, architecture_differences
from histolab.adapters.runtime import default_runtime
from histolab.errors import HistolabError


def scan(root: Path | None = None, base=None, runtime=None) -> list[Entry]:
    """Every adapter (and base model folder) in ``root``; with ``base``, whether each fits it."""
    from histolab.config import Paths

    root = root or Paths.from_env().checkpoints
    runtime = runtime or default_runtime()
    entries = []
    for p in candidates(root):
        if p.is_dir() and (p / "model_index.json").is_file() and not (p / MANIFEST_NAME).is_file():
            entries.append(Entry(p.name, str(p), "base model", "diffusers-pipeline", "", None, ""))
            continue
        if p.is_dir() and not any(p.iterdir()):
            continue
        if p.is_dir() and _manifest_kind(p) == "encoder":
            # A pathology encoder (histolab.encoders) lives here too; it is listed, not applied.
            entries.append(Entry(p.name, str(p), "encoder", "histolab", "", None, "used by projector adapters"))
            continue
        entries.append(_entry(p, base, runtime))
    return entries


def _manifest_kind(folder: Path) -> str | None:
    try:
        return json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def _entry(p: Path, base, runtime) -> Entry:
    try:
        a = runtime.load(p)
    except HistolabError as exc:
        return Entry(p.stem if p.is_file() else p.name, str(p), "?", "?", "", False, str(exc))
    m = a.manifest
    e = Entry(
        a.name,
        str(p),
        a.kind,
        a.format,
        _made_for(a),
        None,
        "",
        trigger=" ".join(_triggers(a)),
        encoder=(m.encoder.get("name", "") if m and m.encoder else getattr(a.payload, "encoder", {}).get("name", ""))
        if a.kind == "projector"
        else "",
    )
    if base is not None:
        try:
            a.payload.validate(base, a.name)
            e.fits = True
            reporter = getattr(a.payload, "load_report", None)
            if reporter is not None:
                rep = reporter(base, a.name)
                e.report, e.ignored = rep.summary(), list(rep.ignored)
            trained_on = (m.base.get("hash") if m else "") or ""
            if trained_on and getattr(base, "hash", "") and trained_on != base.hash:
                e.why = f"shapes fit; trained on {m.base.get('name', '?')} ({trained_on[:10]}), not this base"
        except HistolabError as exc:
            e.fits = False
            e.why = str(exc)
            arch = (m.base.get("architecture") if m and m.base else None) or {}
            diffs = architecture_differences(arch, base) if arch and hasattr(base, "unet") else []
            if diffs:
                e.why += f" [its manifest: {'; '.join(diffs[:3])}]"
    return e


def _triggers(a) -> list[str]:
    if a.kind == "textual_inversion":
        return [e.token for e in a.payload.embeddings]
    if a.manifest and a.manifest.trigger_token:
        return [a.manifest.trigger_token]
    return []


def _made_for(a) -> str:
    m = a.manifest
    if m and m.base:
        h = m.base.get("hash", "")
        return f"{m.base.get('name', '?')}" + (f" ({h[:10]})" if h else "")
    meta = getattr(a.payload, "metadata", {}) or {}
    info = getattr(a.payload, "info", {}) or {}
    for key in ("ss_sd_model_name", "ss_base_model_version"):
        if meta.get(key):
            return str(meta[key])
    if info.get("sd_checkpoint_name"):
        return str(info["sd_checkpoint_name"])
    return ""


def shape_model(source: str = "embedded"):
    """A BaseModel with meta-device networks built from a diffusers folder's configs (no weights read).

    Good for checking what fits; it cannot generate. Sources other than a
    diffusers folder (single files, hub ids) are loaded for real.
    """
    import json

    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from histolab.config import EMBEDDED_BASE_DIR, EMBEDDED_BASE_ID, Paths
    from histolab.errors import ModelNotFound
    from histolab.pipeline import BaseModel, folder_hash, load_base

    folder = EMBEDDED_BASE_DIR if source == EMBEDDED_BASE_ID else Path(source)
    if not folder.is_dir() and not folder.is_absolute():
        folder = Paths.from_env().checkpoints / source
    if not (folder / "model_index.json").is_file():
        if source == EMBEDDED_BASE_ID:
            raise ModelNotFound(f"the embedded base model is not in {EMBEDDED_BASE_DIR}")
        return load_base(source)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(json.loads((folder / "unet" / "config.json").read_text()))
        vae = AutoencoderKL.from_config(json.loads((folder / "vae" / "config.json").read_text()))
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    return BaseModel(
        source=EMBEDDED_BASE_ID if source == EMBEDDED_BASE_ID else str(folder),
        hash=folder_hash(folder),
        vae=vae,
        unet=unet,
        text_encoder=te,
        tokenizer=tokenizer,
        scheduler_config={},
        device="meta",
    )
