"""Shared fixtures: tiny seeded models built in code (no downloads, no GPU)."""

from __future__ import annotations

import os

import pytest
import torch

import histolab  # noqa: F401  (torchvision shim first)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_model():
    """A seeded random TINY base model (32 px, all SD 1.5 block types)."""
    from histolab.embedded.random_init import random_base

    return random_base("tiny", seed=0)


@pytest.fixture()
def paths(tmp_path, monkeypatch):
    """Point every histolab data folder at a temporary directory."""
    from histolab.config import Paths

    monkeypatch.setenv("HISTOLAB_DATA_DIR", str(tmp_path))
    return Paths.from_env()


@pytest.fixture(scope="session", autouse=True)
def patient_gradio_clients():
    """gradio_client's plain requests (config, upload, queue join) use httpx's 5 s default timeout, which a
    loaded CI machine can exceed while the in-process app is busy; every test Client gets minutes instead."""
    import functools

    from gradio_client import Client
    from waiting import GENEROUS

    init = Client.__init__

    @functools.wraps(init)
    def patient(self, *args, httpx_kwargs=None, **kw):
        init(self, *args, httpx_kwargs={"timeout": GENEROUS, **(httpx_kwargs or {})}, **kw)

    Client.__init__ = patient
    yield
    Client.__init__ = init
