"""Background tasks of the app (big batches, evaluations, guidance sweeps), on disk.

A task is a kind (registered with a function), JSON parameters and a folder::

    outputs/tasks/<id>/task.json   kind, params, owner, state, progress, message, result
    outputs/tasks/<id>/lock        held (flock) while a worker runs it
    outputs/tasks/<id>/...         the files the task writes (reports, plots, images)

Tasks run one at a time on a worker thread of the app process: they are the
accelerator-heavy work, and two of them at once would only share the device
and slow each other. A task goes on when the browser that started it closes;
the page lists tasks from disk, so they are shown again on return (and after
an app restart, where a task that was running is "interrupted" and can be
started again with the same parameters: batch runs then resume where their
folder stops). Training jobs are not tasks: they are processes of their own
(histolab.training.jobs).
"""

from __future__ import annotations

import fcntl
import json
import os
import queue
import secrets
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from histolab.errors import Cancelled, HistolabError, InvalidRequest, ModelNotFound
from histolab.locks import lock_held

TASK_FILE = "task.json"
LOCK_FILE = "lock"
STATES = ("queued", "running", "done", "failed", "cancelled", "interrupted")
WRITE_INTERVAL_S = 0.5  # task.json is rewritten at most this often for progress (always on a state change)


@dataclass
class TaskInfo:
    id: str
    kind: str
    title: str
    owner: str
    params: dict[str, Any]
    state: str = "queued"
    fraction: float = 0.0
    message: str = ""
    result: dict[str, Any] = field(default_factory=dict)
    created: float = 0.0
    updated: float = 0.0

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed", "cancelled", "interrupted")

    def line(self) -> str:
        pct = f"{100 * self.fraction:.0f}%" if self.state == "running" else ""
        return f"{self.id}  {self.state:<11} {self.kind:<10} {self.title}  {pct} {self.message}".rstrip()


@dataclass
class TaskContext:
    """What a task function gets: its folder, a progress reporter and its cancel flag."""

    folder: Path
    cancel: threading.Event
    report: Callable[[float, str], None]

    def progress(self, fraction: float, message: str = "") -> None:
        self.report(fraction, message)

    def check_cancel(self) -> None:
        if self.cancel.is_set():
            raise Cancelled("cancelled")


TaskFn = Callable[[dict[str, Any], TaskContext], dict[str, Any]]


class TaskRunner:
    def __init__(self, root: Path):
        self.root = Path(root)
        self._kinds: dict[str, TaskFn] = {}
        self._live: dict[str, TaskInfo] = {}
        self._cancels: dict[str, threading.Event] = {}
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None

    def register(self, kind: str, fn: TaskFn) -> None:
        self._kinds[kind] = fn

    # ------------------------------------------------------------ starting
    def submit(self, kind: str, params: dict[str, Any], *, title: str, owner: str) -> TaskInfo:
        if kind not in self._kinds:
            raise InvalidRequest(f"unknown task kind {kind!r}; known: {sorted(self._kinds)}")
        try:
            json.dumps(params)
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(f"task parameters must be plain data (a restart runs them again): {exc}") from None
        task_id = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
        now = time.time()
        info = TaskInfo(task_id, kind, title, owner, dict(params), created=now, updated=now)
        (self.root / task_id).mkdir(parents=True)
        with self._lock:
            self._live[task_id] = info
            self._cancels[task_id] = threading.Event()
        self._write(info)
        self._ensure_worker()
        self._queue.put(task_id)
        return info

    def rerun(self, task_id: str, *, owner: str, changes: dict[str, Any] | None = None) -> TaskInfo:
        """A new task with the parameters of an old one (e.g. an interrupted batch, with resume on)."""
        old = self.get(task_id)
        if not old.finished:
            raise InvalidRequest(f"task {task_id} is still {old.state}")
        return self.submit(old.kind, {**old.params, **(changes or {})}, title=old.title, owner=owner)

    def _ensure_worker(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="histolab-tasks", daemon=True)
                self._thread.start()

    # ------------------------------------------------------------ reading
    def get(self, task_id: str) -> TaskInfo:
        with self._lock:
            live = self._live.get(task_id)
            if live is not None:
                return TaskInfo(**asdict(live))
        return self._read(task_id)

    def list(self) -> list[TaskInfo]:
        if not self.root.is_dir():
            return []
        out = []
        for p in sorted(self.root.iterdir(), reverse=True):
            if (p / TASK_FILE).is_file():
                try:
                    out.append(self.get(p.name))
                except HistolabError:
                    continue
        return out

    def folder(self, task_id: str) -> Path:
        return self.root / _checked_id(task_id)

    def wait(self, task_id: str, timeout: float) -> TaskInfo:
        """The task's state once it changes or ``timeout`` passes."""
        with self._changed:
            live = self._live.get(task_id)
            if live is not None and not live.finished:
                before = (live.state, live.fraction, live.message)
                self._changed.wait_for(
                    lambda: (live.state, live.fraction, live.message) != before or live.finished, timeout
                )
        return self.get(task_id)

    def cancel(self, task_id: str) -> TaskInfo:
        with self._lock:
            ev = self._cancels.get(task_id)
        if ev is None:
            info = self.get(task_id)
            if not info.finished:
                raise InvalidRequest(f"task {task_id} is run by another process; cancel it there")
            return info
        ev.set()
        return self.get(task_id)

    # ------------------------------------------------------------ worker
    def _work(self) -> None:
        while True:
            task_id = self._queue.get()
            if task_id is None:
                return
            # Each task in a thread that ends with it: a thread that ran torch work keeps an OpenMP team
            # for its lifetime, which slows every later generation (histolab.torch_worker).
            runner = threading.Thread(target=self._run, args=(task_id,), name="histolab-task", daemon=True)
            runner.start()
            runner.join()

    def _run(self, task_id: str) -> None:
        with self._lock:
            info = self._live[task_id]
            cancel = self._cancels[task_id]
        folder = self.root / task_id
        if cancel.is_set():
            self._finish(info, "cancelled", "cancelled before it started")
            return
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        last_write = [0.0]

        def report(fraction: float, message: str = "") -> None:
            with self._changed:
                info.fraction = max(0.0, min(1.0, float(fraction)))
                info.message = message
                info.updated = time.time()
                self._changed.notify_all()
            if time.monotonic() - last_write[0] >= WRITE_INTERVAL_S:
                last_write[0] = time.monotonic()
                self._write(info)

        try:
            self._set(info, state="running", message="starting")
            result = self._kinds[info.kind](dict(info.params), TaskContext(folder, cancel, report))
            with self._lock:
                info.result = result or {}
            self._finish(info, "done", "done", fraction=1.0)
        except Cancelled as exc:
            self._finish(info, "cancelled", str(exc))
        except HistolabError as exc:
            self._finish(info, "failed", str(exc))
        except Exception as exc:  # a bug: keep the app alive, record the traceback beside the task
            (folder / "error.txt").write_text("".join(traceback.format_exception(exc)), encoding="utf-8")
            self._finish(info, "failed", f"{type(exc).__name__}: {exc} (details in the task's error.txt)")
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _set(self, info: TaskInfo, **changes) -> None:
        # On disk before it is visible here: whoever sees the new state in this process (a waiter, then
        # another process reading task.json) must find it on disk too.
        with self._lock:
            after = replace(info, **changes, updated=time.time())
        self._write(after)
        with self._changed:
            for k, v in changes.items():
                setattr(info, k, v)
            info.updated = after.updated
            self._changed.notify_all()

    def _finish(self, info: TaskInfo, state: str, message: str, fraction: float | None = None) -> None:
        changes: dict[str, Any] = {"state": state, "message": message}
        if fraction is not None:
            changes["fraction"] = fraction
        self._set(info, **changes)
        with self._lock:
            self._live.pop(info.id, None)
            self._cancels.pop(info.id, None)

    # ------------------------------------------------------------ disk
    def _write(self, info: TaskInfo) -> None:
        with self._lock:
            data = json.dumps(asdict(info), indent=1, sort_keys=True, default=str)
        path = self.root / info.id / TASK_FILE
        tmp = path.with_name(f".{TASK_FILE}.{threading.get_ident()}.tmp")
        tmp.write_text(data, encoding="utf-8")
        os.replace(tmp, path)

    def _read(self, task_id: str) -> TaskInfo:
        path = self.root / _checked_id(task_id) / TASK_FILE
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelNotFound(f"no task {task_id!r}") from None
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"task {task_id}: its task.json is damaged ({exc})") from exc
        info = TaskInfo(**{k: v for k, v in raw.items() if k in TaskInfo.__dataclass_fields__})
        if not info.finished and not _locked(path.parent / LOCK_FILE):
            # Not run by this process (it is not live here) and no process holds its lock: the app stopped.
            info.state = "interrupted"
            info.message = "the app stopped while this task was queued or running; start it again to continue"
        return info


def _locked(lock_path: Path) -> bool:
    return lock_held(lock_path)


def _checked_id(task_id: str) -> str:
    # Task ids come back from the page: refuse anything that is not one (no paths, no "..").
    text = str(task_id or "")
    if not text or len(text) > 40 or not all(c.isalnum() or c == "-" for c in text):
        raise InvalidRequest(f"not a task id: {text[:40]!r}")
    return text
