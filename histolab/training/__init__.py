"""Training adapters: one accelerate loop, a trainer per method, presets, and background jobs.

    from histolab.training import train, get_preset, JobStore, JobSpec

    cfg = get_preset("tiny-lora").config()
    result = train(cfg, base="embedded", data="bundled", out="checkpoints/my-lora", progress=print)

    job = JobStore().start(JobSpec(out="checkpoints/my-lora", preset="tiny-lora"))  # a separate process
    job.status()   # state and last Progress, read from disk; job.cancel(); job.resume()

Methods: ``lora``, ``dreambooth``, ``textual_inversion``, ``hypernetwork``, ``projector``
(the foundation-embedding adapter). Every checkpoint is an adapter folder that
``histolab.adapters`` loads. Submodules import torch; this package's top level stays light.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "train": "histolab.training.loop",
    "TrainResult": "histolab.training.loop",
    "Progress": "histolab.training.progress",
    "PRESETS": "histolab.training.presets",
    "get_preset": "histolab.training.presets",
    "Preset": "histolab.training.presets",
    "TrainConfig": "histolab.training.config",
    "LoraTrainConfig": "histolab.training.config",
    "DreamBoothTrainConfig": "histolab.training.config",
    "TextualInversionTrainConfig": "histolab.training.config",
    "HypernetworkTrainConfig": "histolab.training.config",
    "ProjectorTrainConfig": "histolab.training.config",
    "config_class": "histolab.training.config",
    "with_overrides": "histolab.training.config",
    "JobStore": "histolab.training.jobs",
    "JobSpec": "histolab.training.jobs",
    "Job": "histolab.training.jobs",
    "JobStatus": "histolab.training.jobs",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'histolab.training' has no attribute {name!r}")


__all__ = sorted(_LAZY)
