"""The browser app: ``build_app(services) -> gr.Blocks`` and how to serve it (``launch_options``).

Nothing is loaded at import, and this package's top level does not import
gradio: the builder and the tabs import it when an app is built.

* ``settings``: ``AppSettings`` from the environment (limits, admin, server).
* ``services``: ``Services``, the models, adapters, review store, jobs and tasks every tab calls.
* ``auth``: who a session is (guest, rater, admin), from server-side state only.
* ``tasks``: background tasks on disk (big batches, evaluations, sweeps).
* one module per tab: ``generate``, ``compare``, ``review``, ``train``, ``evaluate``, ``studies``.
* ``uploads`` (content checks), ``images`` (grids, inline blinded images), ``spaces`` (ZeroGPU).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from histolab.ui.settings import AppSettings

if TYPE_CHECKING:
    from histolab.ui.builder import build_app, launch_options
    from histolab.ui.services import ModelCache, Services

_LAZY = {
    "build_app": "histolab.ui.builder",
    "launch_options": "histolab.ui.builder",
    "Services": "histolab.ui.services",
    "ModelCache": "histolab.ui.services",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'histolab.ui' has no attribute {name!r}")


__all__ = ["AppSettings", "ModelCache", "Services", "build_app", "launch_options"]
