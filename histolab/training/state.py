"""The resume state of a run: one safetensors file, written atomically.

It holds the trainable tensors (float32), the optimiser's state (AdamW's
moments and step counts, one tensor each) and, as JSON in the file's
metadata, everything else: the step, the config, the data and base
fingerprints, the optimiser's parameter groups and the per-epoch history.

The random state needs no saving: every random draw of a step (noise,
timesteps, conditioning dropout, dropout layers) comes from generators seeded
by (seed, step), and each epoch's data order from (seed, epoch); so a run
resumed at step s draws exactly what an uninterrupted run draws at step s.

Writing goes to a temporary file in the same folder, fsync'd, then
``os.replace``'d over the old one: a crash or a full disk mid-write leaves
the previous state intact.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from histolab.errors import TrainingError

STATE_NAME = "state.safetensors"
STATE_VERSION = 1


@dataclass
class TrainingState:
    step: int
    config: dict[str, Any]
    base_hash: str
    data_fingerprint: str
    trainable: dict[str, Any]  # name -> tensor
    optimizer: dict[str, Any]  # torch optimizer state_dict
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per finished epoch
    extra: dict[str, Any] = field(default_factory=dict)


def flatten_optimizer(sd: dict) -> tuple[dict[str, Any], dict[str, Any]]:
    """torch optimizer state_dict -> (tensors for safetensors, JSON-able rest)."""
    import torch

    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optimizer.{idx}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, Any], meta: dict[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = t
    for key, v in meta.get("scalars", {}).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_state(folder: Path, st: TrainingState) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    opt_tensors, opt_meta = flatten_optimizer(st.optimizer)
    tensors = {f"trainable.{k}": v.detach().float().contiguous().cpu() for k, v in st.trainable.items()}
    tensors.update(opt_tensors)
    meta = {
        "version": STATE_VERSION,
        "step": st.step,
        "config": st.config,
        "base_hash": st.base_hash,
        "data_fingerprint": st.data_fingerprint,
        "optimizer": opt_meta,
        "history": st.history,
        "extra": st.extra,
    }
    path = folder / STATE_NAME
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"histolab_state": json.dumps(meta)}))
    return path


def load_state(folder: Path) -> TrainingState | None:
    """The saved state, or None when the folder has none."""
    from histolab.files import load_state_dict

    path = folder / STATE_NAME
    if not path.is_file():
        return None
    try:
        tensors, raw = load_state_dict(path)
        meta = json.loads(raw["histolab_state"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise TrainingError(f"{path} is not a histolab training state ({exc}); remove it to start afresh") from exc
    if meta.get("version") != STATE_VERSION:
        raise TrainingError(f"{path} has state version {meta.get('version')}, this histolab reads {STATE_VERSION}")
    trainable = {k.removeprefix("trainable."): v for k, v in tensors.items() if k.startswith("trainable.")}
    opt = unflatten_optimizer({k: v for k, v in tensors.items() if k.startswith("optimizer.")}, meta["optimizer"])
    return TrainingState(
        step=int(meta["step"]),
        config=meta["config"],
        base_hash=meta["base_hash"],
        data_fingerprint=meta["data_fingerprint"],
        trainable=trainable,
        optimizer=opt,
        history=meta.get("history", []),
        extra=meta.get("extra", {}),
    )


def atomic_write(path: Path, write) -> None:
    """``write(tmp_path)``, fsync, then rename over ``path``; on any error the temporary file is removed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
