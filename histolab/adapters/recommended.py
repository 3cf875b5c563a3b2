"""The generation settings an adapter recommends, from its manifest.

A reference-mode (projector) adapter is validated with little guidance and a
stochastic sampler (the 2026 paper: guidance 1.3, DDPM, 30 steps); prompt
mode's defaults (guidance 7.5, 50 steps) would wash its tokens out. So a
request through such an adapter takes the manifest's ``recommended`` settings
(or, for a projector whose manifest predates them, the paper's) for every
option the user did not set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# The 2026 paper's reference-mode settings (issue 16 quoting the paper): guidance 1.3, DDPM, 30 steps.
REFERENCE_DEFAULTS: dict[str, Any] = {"guidance_scale": 1.3, "scheduler": "ddpm", "steps": 30}
SETTINGS = ("guidance_scale", "scheduler", "steps")


def _resolve(ref: str) -> Path | None:
    from histolab.adapters.loader import find_by_name
    from histolab.config import Paths

    text = str(ref).strip()
    root = Paths.from_env().checkpoints
    for p in (Path(text).expanduser(), root / text):
        if p.exists():
            return p
    return find_by_name(root, text) if root.is_dir() else None


def recommended_settings(ref: str) -> dict[str, Any]:
    """The adapter's recommended generation settings ({} where it has none or cannot be found here)."""
    from histolab.adapters.loader import locate

    path = _resolve(ref)
    if path is None:
        return {}  # loading the request reports the missing adapter with its own message
    try:
        loc = locate(path)
    except Exception:  # the load reports it, with its own message
        return {}
    m = loc.manifest
    rec = {k: v for k, v in (m.recommended if m else {}).items() if k in SETTINGS}
    if not rec and loc.kind == "projector":
        rec = dict(REFERENCE_DEFAULTS)
    return rec


def reference_settings(adapter_refs) -> dict[str, Any]:
    """The first reference-mode adapter's recommended settings among ``adapter_refs``."""
    for ref in adapter_refs:
        rec = recommended_settings(ref)
        if rec:
            return rec
    return {}
