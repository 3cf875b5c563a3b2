"""The app's side of the start-up worker (histolab.startup_worker): start it, send it requests, stop it.

Imports nothing heavy (no torch, no PIL until images arrive): app.py starts the worker before it
imports gradio, so both import side by side on two cores.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import subprocess
import sys
import threading
from dataclasses import asdict
from pathlib import Path

from histolab.startup_worker import receive, send


def bundle_exists(base: str, root: Path | None = None) -> bool:
    """Whether a start-up bundle was written for ``base`` in any dtype (cheap: the worker checks it properly)."""
    from histolab.precision import DTYPE_NAMES
    from histolab.startup_bundle import MANIFEST, bundle_dir

    return any((bundle_dir(base, d, root) / MANIFEST).is_file() for d in DTYPE_NAMES if d != "auto")


class StartupWorker:
    """One worker process. ``state``: starting -> ready | unusable (why in ``detail``) -> closed.
    ``generate`` returns the images, or None when the worker cannot make them exactly (the caller then
    uses the app's own model); errors in the request itself are raised as the engine would raise them."""

    def __init__(self, base: str, device: str = "auto", dtype: str = "auto", cache_dir: Path | None = None, log=None):
        argv = [sys.executable, "-m", "histolab.startup_worker", "--base", base, "--device", device, "--dtype", dtype]
        if cache_dir is not None:
            argv += ["--cache-dir", str(cache_dir)]
        from histolab.config import PROJECT_ROOT

        self.state, self.detail, self.seconds = "starting", "", 0.0
        self.served = 0
        self.settled = threading.Event()  # ready or unusable or gone
        self._turn = threading.Condition()  # notified when a request is served or the worker goes
        self._frames: queue.Queue = queue.Queue()
        self._lock = threading.Lock()  # one request at a time
        self._ids = itertools.count(1)
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log if log is not None else None,
            cwd=PROJECT_ROOT,  # `-m histolab...` resolves from here, as app.py does
        )
        threading.Thread(target=self._read, name="startup-worker-client", daemon=True).start()

    def _read(self) -> None:
        first = True
        while (frame := receive(self.proc.stdout)) is not None:
            header, payloads = frame
            if first:
                first = False
                if "ready" in header:
                    self.state, self.detail = "ready", header["ready"]
                    self.seconds = float(header.get("seconds", 0.0))
                else:
                    self.state, self.detail = "unusable", header.get("unusable", "no answer")
                self.settled.set()
                continue
            self._frames.put((header, payloads))
        if self.state == "starting":
            self.state, self.detail = "unusable", f"the worker exited (status {self.proc.wait()})"
        elif self.state == "ready":
            self.state = "closed"
        self.settled.set()
        self._frames.put(None)
        with self._turn:
            self._turn.notify_all()

    def wait_turn(self, grace_s: float) -> None:
        """Block until the worker has answered a request, or ``grace_s`` passed without one, or it is not
        serving (the app's preload then may start: Services.wait_for_startup_turn)."""
        self.settled.wait()
        with self._turn:
            self._turn.wait_for(lambda: self.served or self.state != "ready", timeout=grace_s)

    def usable(self) -> bool:
        """Waits until the worker is ready or known unusable."""
        self.settled.wait()
        return self.state == "ready"

    def generate(self, request, progress=None, cancel: threading.Event | None = None):
        """The images of ``request`` (a GenerationRequest) as ``generate`` on the app's model would give them,
        or None when this worker does not make them (``detail`` then says why)."""
        if not self.usable():
            return None
        fields = {k: v for k, v in asdict(request).items() if k not in ("reference", "adapters")}
        if request.reference is not None or request.adapters:
            return None
        with self._lock:
            if self.state != "ready":
                return None
            return self._run(fields, progress, cancel)

    def _run(self, fields: dict, progress, cancel):
        from histolab.errors import Cancelled, InvalidRequest

        job = next(self._ids)
        if not self._send({"generate": fields, "id": job}):
            return None
        cancel_sent = False
        while True:
            try:
                frame = self._frames.get(timeout=0.1)
            except queue.Empty:
                # Cancel is polled: the worker's frames and the user's button are two sources, and the
                # button may never be pressed.
                if cancel is not None and cancel.is_set() and not cancel_sent:
                    cancel_sent = True
                    if not self._send({"cancel": job}):
                        return None
                continue
            if frame is None:  # the worker is gone
                return None
            header, payloads = frame
            if "progress" in header:
                if progress is not None:
                    progress(*header["progress"])
            elif "decline" in header:
                self.detail = f"declined: {header['decline']}"
                return None
            elif "error" in header:
                raise (Cancelled if header.get("kind") == "Cancelled" else InvalidRequest)(header["error"])
            else:
                images = _images(header["images"], payloads)
                with self._turn:
                    self.served += 1
                    self._turn.notify_all()
                return images

    def _send(self, header: dict) -> bool:
        try:
            send(self.proc.stdin, header)
            return True
        except (BrokenPipeError, ValueError, OSError):
            return False

    def close(self) -> None:
        """Stop the worker once its current request (if any) is answered."""
        with self._lock:
            if self.proc.stdin and not self.proc.stdin.closed:
                with contextlib.suppress(OSError):
                    self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            if self.state in ("starting", "ready"):
                self.state = "closed"
            self.settled.set()


def _images(items: list[dict], payloads: list[bytes]) -> list:
    from PIL import Image

    from histolab.generation import GeneratedImage
    from histolab.recipe import Recipe

    return [
        GeneratedImage(Image.frombytes("RGB", tuple(it["size"]), data), Recipe.from_dict(it["recipe"]))
        for it, data in zip(items, payloads, strict=True)
    ]
