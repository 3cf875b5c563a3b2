"""What ``python app.py`` serves, read from the environment (``AppSettings.from_env``).

Every field has an environment variable and a default with its reason. The
admin password is never kept: ``from_env`` keeps only a salted PBKDF2 hash of
it (``histolab.ui.auth.hash_password``).
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, fields
from typing import Any

from histolab.config import EMBEDDED_BASE_ID
from histolab.errors import InvalidRequest

LOOPBACK_NAMES = ("localhost",)


@dataclass(frozen=True)
class AppSettings:
    base: str = EMBEDDED_BASE_ID  # HISTOLAB_BASE: the embedded default runs offline on any machine
    device: str = "auto"  # HISTOLAB_DEVICE: cuda when there is one, else cpu
    # HISTOLAB_DTYPE: auto is bfloat16 on CPUs with avx512_bf16/AMX and on GPUs that support it (histolab.precision)
    dtype: str = "auto"
    # HISTOLAB_PRELOAD: load and warm up the base model in the background at start-up (python app.py), so the
    # first visitor does not wait for it; 0 loads it on the first request instead
    preload: bool = True
    # HISTOLAB_COMPILE_UNET: after the preload, compile the U-Net ahead of time in a background process (CPU fast
    # path only; about a minute per batch shape, once per machine: histolab.compiled_unet); 0 never does
    compile_unet: bool = True
    # HISTOLAB_STARTUP_WORKER: with the preload, a second process makes the first images from the start-up bundle
    # that compile-unet writes (histolab.startup_worker) while this one imports and loads; 0 never starts it
    startup_worker: bool = True
    # HISTOLAB_MAX_BATCH: images per click; 8 at 25 steps is a few seconds for the embedded model on 2 cores
    max_batch: int = 8
    max_steps: int = 150  # HISTOLAB_MAX_STEPS: beyond ~100 steps the samplers offered add nothing visible
    queue_size: int = 16  # HISTOLAB_QUEUE_SIZE: requests waiting beyond this are refused, not piled up
    server_name: str = "127.0.0.1"  # GRADIO_SERVER_NAME: this machine only; 0.0.0.0 in a container or Space
    server_port: int | None = None  # GRADIO_SERVER_PORT: None lets Gradio pick (7860 or the next free port)
    admin_user: str = "admin"  # HISTOLAB_ADMIN_USER: the admin's sign-in name and the owner of studies made here
    # HISTOLAB_ADMIN_PASSWORD (kept hashed) or HISTOLAB_ADMIN_PASSWORD_HASH (pbkdf2_sha256$...); empty: no admin
    # sign-in (on a loopback address the local user is admin, see local_admin)
    admin_password_hash: str = ""
    # HISTOLAB_LOCAL_ADMIN: None = decide (admin without sign-in only when the app listens on loopback, has no
    # admin password and is not on a Space: then only people on this machine can reach it)
    local_admin: bool | None = None
    max_upload_mb: int = 20  # HISTOLAB_MAX_UPLOAD_MB: a reference patch or a PNG with its recipe; nothing bigger
    max_upload_side: int = 4096  # HISTOLAB_MAX_UPLOAD_SIDE: pixels; a patch is 64-1024 px, a bomb is millions
    max_adapters: int = 3  # HISTOLAB_MAX_ADAPTERS: adapter slots on the page; more than 3 at once is rare
    max_grid_cells: int = 64  # HISTOLAB_MAX_GRID_CELLS: an 8 x 8 X/Y plot; each cell is one generation
    max_set_images: int = 5000  # HISTOLAB_MAX_SET_IMAGES: per background batch; FID sets are 1-5 k images
    session_hours: float = 12.0  # HISTOLAB_SESSION_HOURS: a sign-in lasts a working day, then asks again
    models_cached: int = 2  # HISTOLAB_MODELS_CACHED: base models kept loaded (each SD 1.5 is ~2-4 GB)
    light_concurrency: int = 8  # HISTOLAB_LIGHT_CONCURRENCY: parallel light requests (ratings, lists) per event
    on_space: bool = False  # SPACE_ID is set on Hugging Face Spaces

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> AppSettings:
        env = dict(os.environ if env is None else env)
        names = {
            "base": "HISTOLAB_BASE",
            "device": "HISTOLAB_DEVICE",
            "dtype": "HISTOLAB_DTYPE",
            "preload": "HISTOLAB_PRELOAD",
            "compile_unet": "HISTOLAB_COMPILE_UNET",
            "startup_worker": "HISTOLAB_STARTUP_WORKER",
            "max_batch": "HISTOLAB_MAX_BATCH",
            "max_steps": "HISTOLAB_MAX_STEPS",
            "queue_size": "HISTOLAB_QUEUE_SIZE",
            "server_name": "GRADIO_SERVER_NAME",
            "server_port": "GRADIO_SERVER_PORT",
            "admin_user": "HISTOLAB_ADMIN_USER",
            "local_admin": "HISTOLAB_LOCAL_ADMIN",
            "max_upload_mb": "HISTOLAB_MAX_UPLOAD_MB",
            "max_upload_side": "HISTOLAB_MAX_UPLOAD_SIDE",
            "max_adapters": "HISTOLAB_MAX_ADAPTERS",
            "max_grid_cells": "HISTOLAB_MAX_GRID_CELLS",
            "max_set_images": "HISTOLAB_MAX_SET_IMAGES",
            "session_hours": "HISTOLAB_SESSION_HOURS",
            "models_cached": "HISTOLAB_MODELS_CACHED",
            "light_concurrency": "HISTOLAB_LIGHT_CONCURRENCY",
        }
        types = {f.name: f.type for f in fields(cls)}
        kw: dict[str, Any] = {}
        for name, var in names.items():
            raw = env.get(var)
            if raw is None or raw.strip() == "":
                continue
            kw[name] = _parse(var, raw.strip(), str(types[name]))
        password, hashed = env.get("HISTOLAB_ADMIN_PASSWORD", ""), env.get("HISTOLAB_ADMIN_PASSWORD_HASH", "")
        if password and hashed:
            raise InvalidRequest("set HISTOLAB_ADMIN_PASSWORD or HISTOLAB_ADMIN_PASSWORD_HASH, not both")
        if password:
            from histolab.ui.auth import hash_password

            kw["admin_password_hash"] = hash_password(password)
        elif hashed:
            from histolab.ui.auth import parse_hash

            parse_hash(hashed)  # a malformed hash is refused at start, not at the first sign-in
            kw["admin_password_hash"] = hashed
        kw["on_space"] = bool(env.get("SPACE_ID"))
        return cls(**kw).check()

    def check(self) -> AppSettings:
        for name in ("max_batch", "max_steps", "queue_size", "max_upload_mb", "max_upload_side", "max_adapters"):
            if getattr(self, name) < 1:
                raise InvalidRequest(f"`{name}` must be at least 1 but is {getattr(self, name)}")
        for name in ("max_grid_cells", "max_set_images", "models_cached", "light_concurrency"):
            if getattr(self, name) < 1:
                raise InvalidRequest(f"`{name}` must be at least 1 but is {getattr(self, name)}")
        if self.session_hours <= 0:
            raise InvalidRequest(f"`session_hours` must be positive but is {self.session_hours}")
        return self

    @property
    def loopback(self) -> bool:
        """True when the server listens on this machine only."""
        name = self.server_name.strip().lower()
        if name in LOOPBACK_NAMES:
            return True
        try:
            return ipaddress.ip_address(name).is_loopback
        except ValueError:
            return False

    @property
    def admin_without_sign_in(self) -> bool:
        """Local single-user use: whoever can reach a loopback-only app is the machine's user."""
        if self.local_admin is not None:
            return self.local_admin and not self.on_space
        return self.loopback and not self.admin_password_hash and not self.on_space

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload_mb * 2**20


def _parse(var: str, raw: str, type_name: str) -> Any:
    if "bool" in type_name:
        low = raw.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise InvalidRequest(f"{var} must be 1/true/yes or 0/false/no but is {raw!r}")
    if "int" in type_name:
        try:
            return int(raw)
        except ValueError:
            raise InvalidRequest(f"{var} must be an integer but is {raw!r}") from None
    if "float" in type_name:
        try:
            return float(raw)
        except ValueError:
            raise InvalidRequest(f"{var} must be a number but is {raw!r}") from None
    return raw
