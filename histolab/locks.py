"""Whether another process holds a lock file: how background tasks and training jobs tell "running"
from "stopped" (the kernel frees an flock when its process dies, even by kill -9)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


def lock_held(lock_path: Path, *, create: bool = False) -> bool:
    """True while some process holds an exclusive flock on ``lock_path``; False when the file is
    missing (unless ``create``) or free. Checks without keeping the lock."""
    flags = os.O_RDWR | (os.O_CREAT if create else 0)
    try:
        fd = os.open(lock_path, flags, 0o644)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)
