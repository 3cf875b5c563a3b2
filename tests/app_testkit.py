"""Helpers for the tests/test_app_*.py and tests/test_browser_*.py files: an app on temporary folders
with the tiny model injected, served on a free port, and its adapters and image sets."""

from __future__ import annotations

import contextlib
from pathlib import Path

from adapters_testkit import kohya_lora_state, save_safetensors

from histolab.config import Paths
from histolab.ui import AppSettings, Services, build_app, launch_options

ADMIN_PASSWORD = "correct horse battery staple"
SETTINGS = dict(max_batch=3, max_steps=10, queue_size=8, max_grid_cells=12, max_set_images=40, local_admin=False)


def make_settings(**kw) -> AppSettings:
    from histolab.ui.auth import hash_password

    values = {**SETTINGS, "admin_password_hash": hash_password(ADMIN_PASSWORD, iterations=1000), **kw}
    return AppSettings(**values)


def make_services(root: Path, model, **kw) -> Services:
    paths = Paths.from_env({"HISTOLAB_DATA_DIR": str(root)})
    extractor = kw.pop("extractor", None)
    return Services(make_settings(**kw), paths, model_loader=lambda source: model, extractor=extractor)


def add_lora(model, checkpoints: Path, name: str, seed: int) -> Path:
    """A kohya-layout LoRA for the tiny model, as a single file in checkpoints/ (the registry lists it)."""
    return save_safetensors(checkpoints / f"{name}.safetensors", kohya_lora_state(model, seed=seed, scale=0.5))


@contextlib.contextmanager
def served(services: Services):
    """The app launched on a free port (launch options as ``python app.py`` uses them); yields (app, url)."""
    app = build_app(services)
    options = launch_options(services.settings, services=services)
    options.update(server_port=None, quiet=True, prevent_thread_lock=True)
    _, url, _ = app.launch(**options)
    try:
        yield app, url
    finally:
        app.close()
