"""Where things live. Every path can be moved with an environment variable so
that a hosted Space can keep its data on persistent storage (e.g. ``/data``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PACKAGE_ROOT = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Paths:
    """The folders histolab reads and writes.

    ``data_dir`` holds ``checkpoints/`` and ``annotations/`` unless those are
    set one by one; it defaults to the project checkout.
    """

    checkpoints: Path
    annotations: Path
    jobs: Path
    outputs: Path

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Paths:
        env = dict(os.environ if env is None else env)
        data = Path(env.get("HISTOLAB_DATA_DIR", PROJECT_ROOT))
        return cls(
            checkpoints=Path(env.get("HISTOLAB_CHECKPOINTS", data / "checkpoints")),
            annotations=Path(env.get("HISTOLAB_ANNOTATIONS", data / "annotations")),
            jobs=Path(env.get("HISTOLAB_JOBS", data / "jobs")),
            outputs=Path(env.get("HISTOLAB_OUTPUTS", data / "outputs")),
        )


# The embedded default base model ships with the package source, not under the
# (movable) data dir, so that a Space with /data still finds it.
EMBEDDED_BASE_DIR = PROJECT_ROOT / "checkpoints" / "embedded-base"
EMBEDDED_BASE_ID = "embedded"


def cache_root(env: dict[str, str] | None = None) -> Path:
    """Where histolab keeps what it derives and can remake (converted weights, compiled networks):
    $HISTOLAB_CACHE, else ~/.cache/histolab (on a Space, point it at /data to keep it across restarts)."""
    root = (os.environ if env is None else env).get("HISTOLAB_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "histolab"
