"""Adapters over a loaded base model: LoRA, DreamBooth, textual inversion,
hypernetwork and the foundation-embedding projector (reference-patch mode).

``applied(model, specs)`` is what the generation engine uses; ``scan`` lists
what is in ``checkpoints/``; ``parse_spec("path:0.8")`` reads the CLI form.
Submodules import torch; this package's top level stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from histolab.adapters.spec import AdapterSpec, parse_spec

if TYPE_CHECKING:
    from histolab.adapters.entry import Entry
    from histolab.adapters.registry import scan
    from histolab.adapters.runtime import AdapterRuntime, RuntimeConfig, applied, default_runtime

_LAZY = {
    "applied": "histolab.adapters.runtime",
    "default_runtime": "histolab.adapters.runtime",
    "AdapterRuntime": "histolab.adapters.runtime",
    "RuntimeConfig": "histolab.adapters.runtime",
    "scan": "histolab.adapters.registry",
    "Entry": "histolab.adapters.entry",
    "Manifest": "histolab.adapters.manifest",
    "read_manifest": "histolab.adapters.manifest",
    "write_manifest": "histolab.adapters.manifest",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'histolab.adapters' has no attribute {name!r}")


__all__ = [
    "AdapterRuntime",
    "AdapterSpec",
    "Entry",
    "RuntimeConfig",
    "applied",
    "default_runtime",
    "parse_spec",
    "scan",
]
