"""Shared fixtures: tiny seeded models built in code (no downloads, no GPU)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

# One thread per process, set before torch loads so that every child process (job workers, app and CLI
# subprocesses) inherits it too. The tiny test models gain nothing from a second thread, and on a busy
# machine OpenMP's thread hand-offs between cores that other work holds cost far more than the work:
# a 48-step tiny LoRA job took 42 s with two threads under a load of 9 and 2.3 s with one.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"

import pytest
import torch

import histolab  # noqa: F401  (torchvision shim first)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# No background U-Net compiles (minutes of CPU) from apps the tests start, and compiled packages only in
# a folder of this test run (tests/test_compiled_unet.py builds one on purpose).
os.environ["HISTOLAB_COMPILE_UNET"] = "0"
os.environ["HISTOLAB_COMPILED_CACHE"] = tempfile.mkdtemp(prefix="histolab-test-compiled-")
atexit.register(shutil.rmtree, os.environ["HISTOLAB_COMPILED_CACHE"], True)
torch.set_num_threads(1)


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
