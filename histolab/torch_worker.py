"""One long-lived thread for the app's network work (model loads, warm-ups, generations).

GNU OpenMP, the runtime of PyTorch's CPU wheels, keeps a team of worker threads for every thread that
has run parallel work, for as long as that thread lives. Once the teams hold more threads than there
are cores, the workers stop spinning between parallel regions and sleep instead, and each of the
hundreds of small regions in a 64 px U-Net pass then pays a wake-up. Measured on a 2-core machine
(the embedded U-Net in bfloat16, 15 passes at batch 8): 0.50 s in a thread while no other live thread
had run torch work, 0.94-1.07 s once the main thread had; a whole 4-image, 15-step generation took
1.48 s inside the app against 0.82 s in a plain script. The app's request threads come and go and the
preload has a thread of its own, so the app hands all that work to this one thread instead.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any


class TorchWorker:
    """``call(fn, ...)`` runs ``fn`` on the worker thread and returns its result (or raises its error);
    calls from the worker thread itself run at once. ``prepare`` runs on the worker before each call
    (the app sets torch's thread count there: histolab.threads)."""

    def __init__(self, prepare: Callable[[], Any] | None = None, name: str = "histolab-torch"):
        self.prepare = prepare
        self.name = name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def on_worker(self) -> bool:
        return threading.current_thread() is self._thread

    def call(self, fn: Callable[..., Any], *args, **kwargs) -> Any:
        if self.on_worker():
            return fn(*args, **kwargs)
        self._ensure_thread()
        done, box = threading.Event(), {}
        self._queue.put((fn, args, kwargs, box, done))
        done.wait()
        if "error" in box:
            raise box["error"]
        return box["value"]

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while True:
            fn, args, kwargs, box, done = self._queue.get()
            try:
                if self.prepare is not None:
                    self.prepare()
                box["value"] = fn(*args, **kwargs)
            except BaseException as exc:  # handed to the caller's thread, which raises it
                box["error"] = exc
            finally:
                done.set()
