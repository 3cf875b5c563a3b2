"""Hugging Face Spaces: detection, and the optional ZeroGPU decorator.

On a ZeroGPU Space (``SPACES_ZERO_GPU`` is set there and the ``spaces``
package is installed by the platform) the generation handlers are wrapped in
``spaces.GPU`` so a GPU is attached for each call. Anywhere else ``gpu(fn)``
returns ``fn`` itself, and ``spaces`` is neither needed nor imported: it is
not in requirements.txt.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable
from typing import Any

GPU_SECONDS = 60  # ZeroGPU's default slot; a batch of 8 at 50 steps at 512 px takes well under that on an H200


def on_space(env: dict[str, str] | None = None) -> bool:
    return bool((os.environ if env is None else env).get("SPACE_ID"))


def zero_gpu(env: dict[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return bool(env.get("SPACES_ZERO_GPU")) and importlib.util.find_spec("spaces") is not None


def gpu(fn: Callable[..., Any], *, duration: int = GPU_SECONDS, env: dict[str, str] | None = None):
    """``spaces.GPU(duration=...)(fn)`` on a ZeroGPU Space, else ``fn`` unchanged."""
    if not zero_gpu(env):
        return fn
    import spaces

    wrapped = spaces.GPU(duration=duration)(fn)
    return functools.wraps(fn)(wrapped)
