"""Samplers by name, each built from the base model's own scheduler config.

The names are ours; ``A1111_NAMES`` gives the label SD-webui writes in its
``parameters`` text so that recipes read the same in both tools.
"""

from __future__ import annotations

from typing import Any

from histolab.errors import InvalidRequest

# name -> (diffusers class, extra config)
_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
}

A1111_NAMES = {
    "ddpm": "DDPM",
    "ddim": "DDIM",
    "pndm": "PLMS",
    "euler": "Euler",
    "euler_a": "Euler a",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
}
FROM_A1111 = {v: k for k, v in A1111_NAMES.items()}

SCHEDULER_NAMES = tuple(_SCHEDULERS)


def check_name(name: str) -> str:
    if name not in _SCHEDULERS:
        raise InvalidRequest(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULER_NAMES)}")
    return name


def build_scheduler(name: str, base_config: dict[str, Any]):
    """A fresh scheduler instance (schedulers hold per-run state: never share one)."""
    import diffusers

    cls_name, extra = _SCHEDULERS[check_name(name)]
    cls = getattr(diffusers, cls_name)
    config = {k: v for k, v in base_config.items() if not k.startswith("_")}
    config.update(extra)
    return cls.from_config(config)
