"""The browser app: ``build_app(settings) -> gr.Blocks`` and how to serve it.

Nothing is loaded at import: the base model is loaded on the first generation
and cached (``ModelCache``). Handlers are plain functions (histolab.ui.generate)
that call the library; typed errors become ``gr.Error`` there. This is the
minimal generation page; the full app (training, evaluation, review tabs)
builds on the same ``build_app``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from histolab.config import EMBEDDED_BASE_DIR, EMBEDDED_BASE_ID, Paths


@dataclass(frozen=True)
class AppSettings:
    """What ``python app.py`` serves. Each can be set by an environment variable (``from_env``)."""

    base: str = EMBEDDED_BASE_ID  # HISTOLAB_BASE: the embedded default runs offline on any machine
    device: str = "auto"  # HISTOLAB_DEVICE: cuda when there is one, else cpu
    dtype: str = "auto"  # HISTOLAB_DTYPE: float32 on CPU, bfloat16/float16 on GPUs
    max_batch: int = (
        8  # HISTOLAB_MAX_BATCH: images per click; 8 at 25 steps is a few seconds for the embedded model on 2 cores
    )
    max_steps: int = 150  # HISTOLAB_MAX_STEPS: beyond ~100 steps the samplers offered add nothing visible
    queue_size: int = 16  # HISTOLAB_QUEUE_SIZE: requests waiting beyond this are refused, not piled up
    server_name: str = "127.0.0.1"  # GRADIO_SERVER_NAME: this machine only; 0.0.0.0 in a container or Space
    server_port: int | None = None  # GRADIO_SERVER_PORT: None lets Gradio pick (7860 or the next free port)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> AppSettings:
        env = dict(os.environ if env is None else env)
        names = {
            "base": "HISTOLAB_BASE",
            "device": "HISTOLAB_DEVICE",
            "dtype": "HISTOLAB_DTYPE",
            "max_batch": "HISTOLAB_MAX_BATCH",
            "max_steps": "HISTOLAB_MAX_STEPS",
            "queue_size": "HISTOLAB_QUEUE_SIZE",
            "server_name": "GRADIO_SERVER_NAME",
            "server_port": "GRADIO_SERVER_PORT",
        }
        kw: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(names[f.name])
            if raw is None or raw == "":
                continue
            if f.name in ("max_batch", "max_steps", "queue_size", "server_port"):
                try:
                    kw[f.name] = int(raw)
                except ValueError:
                    from histolab.errors import InvalidRequest

                    raise InvalidRequest(f"{names[f.name]} must be an integer but is {raw!r}") from None
            else:
                kw[f.name] = raw
        return cls(**kw)


class ModelCache:
    """The base model, loaded on first use and kept; one load even when requests race."""

    def __init__(self, loader: Callable[[], Any]):
        self._loader = loader
        self._model = None
        self._lock = threading.Lock()
        self.loads = 0

    def get(self):
        with self._lock:
            if self._model is None:
                self._model = self._loader()
                self.loads += 1
            return self._model


def default_loader(settings: AppSettings) -> Callable[[], Any]:
    def load():
        from histolab.pipeline import load_base, optimize_for_inference, resolve_device, resolve_dtype

        device = resolve_device(settings.device)
        model = load_base(settings.base, device=device, dtype=resolve_dtype(settings.dtype, device))
        return optimize_for_inference(model)

    return load


def build_app(settings: AppSettings | None = None, *, model_loader: Callable[[], Any] | None = None):
    """The Gradio app (queued), with nothing loaded until the first request.

    ``model_loader`` (tests, embedding apps): returns the ``BaseModel`` to use;
    default: ``settings.base`` through histolab.pipeline.load_base.
    """
    import gradio as gr

    from histolab.ui import generate as generate_tab

    settings = settings or AppSettings()
    cache = ModelCache(model_loader or default_loader(settings))
    with gr.Blocks(title="histolab", analytics_enabled=False) as app:
        gr.Markdown("# histolab\nGenerate synthetic tissue patches. Every PNG carries its recipe.")
        generate_tab.build(settings, cache)
    app.model_cache = cache  # for tests and for the full app's other tabs
    app.queue(max_size=settings.queue_size, default_concurrency_limit=1)
    return app


def launch_options(settings: AppSettings, paths: Paths | None = None) -> dict[str, Any]:
    """``launch()`` keyword arguments: local, no telemetry, and never serving model or review files."""
    paths = paths or Paths.from_env()
    # Gradio serves only what the app returns or allowed_paths names; blocking these
    # folders as well means no future handler can hand out a weights file or the
    # review database (whose rows tell real from synthetic) by mistake.
    blocked = {str(p.resolve()) for p in (paths.checkpoints, paths.annotations, EMBEDDED_BASE_DIR.parent)}
    return {
        "server_name": settings.server_name,
        "server_port": settings.server_port,
        "enable_monitoring": False,
        "blocked_paths": sorted(blocked),
        "allowed_paths": [],
        "ssr_mode": False,  # no Node server: the page works offline from the Python server alone
        "mcp_server": False,
        "max_file_size": "20mb",  # a reference patch or a PNG with its recipe; nothing bigger belongs here
    }
