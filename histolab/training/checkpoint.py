"""Checkpoint folders of a run, written so that a crash or a full disk never breaks the last good one.

Layout of a run's output folder (``--out``)::

    NAME/                       the adapter (manifest.json + weights): the newest checkpoint while training,
                                the best epoch (by validation FID) when the run is done
    NAME/epochs/epoch-003/      every epoch's complete adapter folder, with samples.png
    NAME/training/state.safetensors   resume state (optimiser, step, history)
    NAME/training/...           cached latents, embeddings, class images, the validation reference, log.txt

An epoch folder is written under a temporary name and renamed into place;
files of the top-level adapter are each written to a temporary file and
renamed over the old one (folders such as DreamBooth's ``unet/`` are swapped
by two renames), the manifest last.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

EPOCHS_DIR = "epochs"
WORK_DIR = "training"
_EPOCH = re.compile(r"^epoch-(\d+)$")


def epoch_dir(out: Path, epoch: int) -> Path:
    return out / EPOCHS_DIR / f"epoch-{epoch:03d}"


def epoch_folders(out: Path) -> dict[int, Path]:
    root = out / EPOCHS_DIR
    if not root.is_dir():
        return {}
    found = {}
    for p in root.iterdir():
        m = _EPOCH.match(p.name)
        if m and p.is_dir():
            found[int(m.group(1))] = p
    return dict(sorted(found.items()))


def write_folder(target: Path, write) -> Path:
    """``write(tmp_folder)`` then rename it to ``target`` (replacing an older one of the same name)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        _fsync_tree(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.{os.getpid()}.old")
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def promote(src: Path, out: Path) -> None:
    """Make ``out`` hold the adapter in ``src`` (an epoch folder): each entry replaced atomically, manifest last."""
    from histolab.adapters.manifest import MANIFEST_NAME

    entries = sorted(p for p in src.iterdir() if not p.name.startswith("."))
    pid = os.getpid()
    for p in [e for e in entries if e.name != MANIFEST_NAME] + [e for e in entries if e.name == MANIFEST_NAME]:
        dest = out / p.name
        if p.is_dir():
            tmp = out / f".{p.name}.{pid}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                shutil.copytree(p, tmp)
                _fsync_tree(tmp)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            if dest.exists():
                old = out / f".{p.name}.{pid}.old"
                os.rename(dest, old)
                os.rename(tmp, dest)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, dest)
        else:
            from histolab.training.state import atomic_write

            atomic_write(dest, lambda tmp, p=p: shutil.copyfile(p, tmp))


def prune(out: Path, keep: int, protect: set[int]) -> list[int]:
    """Delete the oldest epoch folders beyond the newest ``keep`` (never those in ``protect``)."""
    if keep <= 0:
        return []
    folders = epoch_folders(out)
    newest = sorted(folders)[-keep:]
    removed = []
    for e, p in folders.items():
        if e not in newest and e not in protect:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(e)
    return removed


def clean_temporaries(out: Path) -> None:
    """Remove what an interrupted write left behind (``.name.PID.tmp`` / ``.old``)."""
    for root in (out, out / EPOCHS_DIR, out / WORK_DIR):
        if not root.is_dir():
            continue
        for p in root.iterdir():
            if p.name.startswith(".") and p.name.endswith((".tmp", ".old")):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
