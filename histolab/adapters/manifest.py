"""``manifest.json``: what an adapter folder holds and which base it fits.

Every adapter folder under ``checkpoints/`` carries one. It says what kind of
adapter the weights are, the base model they were trained on (name, content
hash and architecture shapes), the image encoder for a foundation-embedding
adapter, the trigger token for a textual inversion, and the training config
and metrics, so a folder can be judged without loading its weights.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from histolab.errors import AdapterError

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
KINDS = ("lora", "dreambooth", "textual_inversion", "hypernetwork", "projector")


@dataclass
class Manifest:
    kind: str
    name: str = ""
    # Weight file(s), relative to the folder; empty: the kind's usual file name.
    weights: str = ""
    # {"name": ..., "hash": sha256, "architecture": architecture(model)}
    base: dict[str, Any] = field(default_factory=dict)
    # {"name": "uni2-h", "weights_hash": sha256, "dim": 1536}; projector only.
    encoder: dict[str, Any] = field(default_factory=dict)
    trigger_token: str = ""
    # Kind-specific settings needed to apply the weights (rank, alpha, n_tokens, ...).
    config: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    # generation settings the adapter was validated with (e.g. {"guidance_scale": 1.3, "scheduler": "ddpm",
    # "steps": 30}); generation uses them unless the user sets them
    recommended: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    version: int = MANIFEST_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "manifest.json") -> Manifest:
        if not isinstance(d, dict):
            raise AdapterError(f"{where}: expected a JSON object, found {type(d).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise AdapterError(f"{where}: unknown fields {unknown}; known fields are {sorted(known)}")
        kind = d.get("kind")
        if kind not in KINDS:
            raise AdapterError(f"{where}: `kind` must be one of {', '.join(KINDS)} but is {kind!r}")
        for name in ("base", "encoder", "config", "training", "metrics", "recommended"):
            if not isinstance(d.get(name, {}), dict):
                raise AdapterError(f"{where}: `{name}` must be a JSON object")
        for name in ("name", "weights", "trigger_token", "created"):
            if not isinstance(d.get(name, ""), str):
                raise AdapterError(f"{where}: `{name}` must be text")
        return cls(**d)


def read_manifest(folder: str | Path) -> Manifest | None:
    """The folder's manifest, or None when it has none."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{path}: not valid JSON ({exc})") from exc
    return Manifest.from_dict(data, str(path))


def write_manifest(folder: str | Path, manifest: Manifest) -> Path:
    if manifest.kind not in KINDS:
        raise AdapterError(f"`kind` must be one of {', '.join(KINDS)} but is {manifest.kind!r}")
    if not manifest.created:
        import datetime

        manifest.created = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    path = Path(folder) / MANIFEST_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(manifest.to_json() + "\n", encoding="utf-8")
    return path


def architecture(model) -> dict[str, Any]:
    """The shapes that decide whether weights fit a base model (not its values)."""
    u, t = model.unet.config, model.text_encoder.config
    return {
        "unet": {
            "in_channels": int(u.in_channels),
            "block_out_channels": [int(c) for c in u.block_out_channels],
            "layers_per_block": u.layers_per_block,
            "down_block_types": list(u.down_block_types),
            "up_block_types": list(u.up_block_types),
            "cross_attention_dim": int(u.cross_attention_dim),
            "attention_head_dim": u.attention_head_dim
            if isinstance(u.attention_head_dim, int)
            else list(u.attention_head_dim),
        },
        "text_encoder": {
            "hidden_size": int(t.hidden_size),
            "num_hidden_layers": int(t.num_hidden_layers),
            "intermediate_size": int(t.intermediate_size),
        },
    }


def base_info(model) -> dict[str, Any]:
    """The ``base`` entry of a manifest for adapters trained on ``model``."""
    return {"name": model.name, "hash": model.hash, "architecture": architecture(model)}


def architecture_differences(expected: dict[str, Any], model) -> list[str]:
    """Where a manifest's recorded architecture differs from ``model``: 'unet.cross_attention_dim: 768 vs 256'."""
    found = architecture(model)
    out = []
    for part, fields_ in found.items():  # in architecture()'s order: the U-Net first
        for key, have in fields_.items():
            want = (expected.get(part) or {}).get(key)
            if want is not None and _norm(want) != _norm(have):
                out.append(f"{part}.{key}: adapter {want} vs base {have}")
    return out


def _norm(v):
    return list(v) if isinstance(v, tuple) else v
