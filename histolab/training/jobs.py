"""Training jobs: a run in its own process, with its state and log on disk.

A job is a folder under the jobs dir (``Paths.from_env().jobs``)::

    jobs/<id>/job.json      what to run: method, preset, overrides, base, data, out
    jobs/<id>/status.json   state (queued, running, done, cancelled, failed, interrupted) and the last progress
    jobs/<id>/log.txt       everything the run printed
    jobs/<id>/cancel        present: the run saves its state and stops at the next step
    jobs/<id>/lock          held (flock) by the process running it; the kernel frees it when the process dies

``JobStore.start(spec)`` checks the settings (an invalid hyperparameter is
refused here, before any process starts), writes the folder and starts
``python -m histolab.training.jobs run <folder>`` detached from the caller:
the app stays responsive, and the job survives the browser closing and the
app restarting. Anyone can read a job's status from disk; a job whose status
says "running" but whose lock is free died (a crash or ``kill -9``) and is
reported "interrupted"; ``resume()`` continues it from its last checkpoint.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from histolab.config import PROJECT_ROOT, Paths
from histolab.errors import HistolabError, InvalidRequest, ModelNotFound
from histolab.locks import lock_held
from histolab.training.progress import Progress

JOB_FILE = "job.json"
STATUS_FILE = "status.json"
LOG_FILE = "log.txt"
CANCEL_FILE = "cancel"
LOCK_FILE = "lock"
STATES = ("queued", "running", "done", "cancelled", "failed", "interrupted")
STATUS_INTERVAL_S = 0.5  # status.json is rewritten at most this often while training (and at every phase change)


@dataclass
class JobSpec:
    """What a job runs. ``method``/``preset``/``overrides`` make the config; with ``resume`` and none of them,
    the settings saved in ``out`` are used."""

    out: str
    method: str = ""
    preset: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)
    base: str | None = None  # None: "embedded" for a new run, the saved one when resuming
    data: str | None = None  # None: "bundled" for a new run, the saved one when resuming
    resume: bool = False
    device: str | None = None  # None: a GPU when there is one

    def config(self):
        """The checked TrainConfig, or None when resuming with the saved settings. Raises InvalidRequest."""
        from histolab.training.config import canonical_method, config_class, with_overrides
        from histolab.training.presets import get_preset

        if not self.method and not self.preset:
            if self.resume and not self.overrides:
                return None
            if self.resume:
                # Settings given on resume are checked against the saved ones (the loop names any difference).
                from histolab.training.config import config_from_dict
                from histolab.training.state import load_state

                st = load_state(Path(self.out) / "training")
                if st is None:
                    raise InvalidRequest(f"nothing to resume in {self.out}: give --method or --preset to start a run")
                return with_overrides(config_from_dict(st.config), self.overrides).check()
            raise InvalidRequest("give a --method or a --preset (or --resume with an --out that holds a run)")
        if self.preset:
            p = get_preset(self.preset)
            if self.method and canonical_method(self.method) != p.method:
                raise InvalidRequest(
                    f"preset {p.name!r} is for method {p.method!r}, not {canonical_method(self.method)!r}"
                )
            cfg = p.config()
        else:
            cfg = config_class(self.method)()
        return with_overrides(cfg, self.overrides).check()

    def check(self) -> None:
        """Everything that can be refused before a process starts."""
        cfg = self.config()
        if self.data not in (None, "bundled") and not Path(self.data).exists():
            raise InvalidRequest(f"--data {self.data!r}: no such folder or file (or use 'bundled')")
        if not self.out:
            raise InvalidRequest("--out is empty: give the folder to write the adapter to, e.g. checkpoints/NAME")
        out = Path(self.out)
        from histolab.training.state import STATE_NAME

        if (out / "training" / STATE_NAME).is_file() and not self.resume:
            raise InvalidRequest(
                f"{out} already holds a training run; pass --resume to continue it or choose another --out"
            )
        if cfg is None and not (out / "training" / STATE_NAME).is_file():
            raise InvalidRequest(f"nothing to resume in {out}: give --method or --preset to start a run there")


@dataclass
class JobStatus:
    id: str
    state: str
    message: str = ""
    progress: dict[str, Any] = field(default_factory=dict)
    pid: int | None = None
    out: str = ""
    method: str = ""
    preset: str = ""
    created: float = 0.0
    updated: float = 0.0

    @property
    def finished(self) -> bool:
        return self.state in ("done", "cancelled", "failed", "interrupted")

    def line(self) -> str:
        p = (
            Progress(**{k: v for k, v in self.progress.items() if k in Progress.__dataclass_fields__})
            if self.progress
            else None
        )
        what = p.line() if p else ""
        extra = self.message if self.message and (p is None or self.message != p.message) else ""
        return f"{self.id}  {self.state:<11} {self.method or '?':<17} {self.out}  {what}  {extra}".rstrip()


class Job:
    def __init__(self, folder: Path):
        self.dir = Path(folder)
        self.id = self.dir.name

    # ------------------------------------------------------------- reading
    def spec(self) -> JobSpec:
        return JobSpec(**json.loads((self.dir / JOB_FILE).read_text(encoding="utf-8")))

    def _raw_status(self) -> dict[str, Any]:
        try:
            return json.loads((self.dir / STATUS_FILE).read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return {"state": "queued"}

    def running(self) -> bool:
        """True while a process holds the job's lock."""
        return lock_held(self.dir / LOCK_FILE, create=True)

    def status(self) -> JobStatus:
        raw = self._raw_status()
        spec = self.spec()
        state = raw.get("state", "queued")
        message = raw.get("message", "")
        if state == "running" and not self.running():
            # Read again: a run that just finished wrote its last state and then let go of the lock, so a
            # "running" read before that and a free lock after are an ended run, not a dead one.
            raw = self._raw_status()
            state = raw.get("state", "queued")
            message = raw.get("message", "")
            if state == "running":
                state = "interrupted"
                message = "the training process died (crash or kill); resume it to continue from the last checkpoint"
        return JobStatus(
            id=self.id,
            state=state,
            message=message,
            progress=raw.get("progress", {}),
            pid=raw.get("pid"),
            out=spec.out,
            method=spec.method or raw.get("method", ""),
            preset=spec.preset,
            created=raw.get("created", 0.0),
            updated=raw.get("updated", 0.0),
        )

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = (self.dir / LOG_FILE).read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # ------------------------------------------------------------- control
    def cancel(self) -> None:
        """Ask the run to stop: it saves its state and the current adapter at the next step."""
        (self.dir / CANCEL_FILE).write_text(str(time.time()))

    def resume(self, *, python: str | None = None, threads: int | None = None) -> Job:
        """Continue an interrupted or cancelled job from its last checkpoint, in a new process
        (``threads`` as in JobStore.start)."""
        if self.running():
            raise InvalidRequest(f"job {self.id} is still running")
        spec = self.spec()
        spec.resume = True
        _write_json(self.dir / JOB_FILE, asdict(spec))
        (self.dir / CANCEL_FILE).unlink(missing_ok=True)
        _write_status(self.dir, {"state": "queued", "message": "resuming"})
        spawn(self.dir, python=python, threads=threads)
        return self

    def wait(self, timeout: float | None = None, poll: float = 0.5, callback=None) -> JobStatus:
        """Block until the job finishes (or ``timeout``); ``callback(JobStatus)`` on every change seen."""
        end = None if timeout is None else time.monotonic() + timeout
        last = None
        while True:
            st = self.status()
            key = (st.state, st.updated)
            if callback is not None and key != last:
                callback(st)
            last = key
            if st.finished:
                return st
            if end is not None and time.monotonic() > end:
                return st
            time.sleep(poll)


class JobStore:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else Paths.from_env().jobs

    def create(self, spec: JobSpec) -> Job:
        spec = JobSpec(**asdict(spec))
        spec.out = str(Path(spec.out).expanduser().resolve()) if spec.out else ""
        if spec.data not in (None, "bundled"):
            spec.data = str(Path(spec.data).expanduser().resolve())
        if spec.base not in (None, "embedded") and Path(spec.base).exists():
            spec.base = str(Path(spec.base).resolve())
        spec.check()
        cfg = spec.config()
        if cfg is not None and (spec.method or spec.preset):
            spec.method = cfg.method  # the canonical name, also when a preset implied it
        self.root.mkdir(parents=True, exist_ok=True)
        job_id = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
        folder = self.root / job_id
        folder.mkdir()
        _write_json(folder / JOB_FILE, asdict(spec))
        if cfg is not None:
            method = cfg.method
        else:  # resuming with the saved settings
            from histolab.training.state import load_state

            method = load_state(Path(spec.out) / "training").config.get("method", "")
        _write_status(folder, {"state": "queued", "created": time.time(), "method": method})
        return Job(folder)

    def start(self, spec: JobSpec, *, python: str | None = None, threads: int | None = None) -> Job:
        """Check ``spec``, create the job and run it in its own process; returns at once.
        ``threads``: the job's torch threads (histolab.threads; None: torch's default)."""
        job = self.create(spec)
        spawn(job.dir, python=python, threads=threads)
        return job

    def get(self, job_id: str) -> Job:
        folder = self.root / job_id
        if not (folder / JOB_FILE).is_file():
            raise ModelNotFound(f"no job {job_id!r} in {self.root}; `python -m histolab jobs list` lists them")
        return Job(folder)

    def list(self) -> list[Job]:
        if not self.root.is_dir():
            return []
        return [Job(p) for p in sorted(self.root.iterdir()) if (p / JOB_FILE).is_file()]


def spawn(folder: Path, *, python: str | None = None, threads: int | None = None) -> subprocess.Popen:
    """Start the worker for ``folder``, detached (own session), its output appended to the job's log."""
    from histolab.threads import job_environment

    env = job_environment(dict(os.environ), threads)
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("PYTHONUNBUFFERED", "1")
    with open(folder / LOG_FILE, "ab") as log:
        return subprocess.Popen(
            [python or sys.executable, "-m", "histolab.training.jobs", "run", str(folder)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )


# ------------------------------------------------------------------- worker


def run_job(folder: Path, *, echo=None, cancel_event: threading.Event | None = None, encoder=None, validator=None):
    """Run the job in ``folder`` in this process (the worker's body; the CLI's foreground mode).

    ``echo``: also pass each log line and progress line to this function (a terminal).
    Returns the TrainResult; raises what training raised, after recording it in status.json.
    """
    from histolab.training.loop import train

    folder = Path(folder)
    job = Job(folder)
    _quiet_progress_bars()
    lock_fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock_fd)
        raise InvalidRequest(f"job {job.id} is already running in another process") from None
    spec = job.spec()
    event = cancel_event or threading.Event()
    (folder / CANCEL_FILE).unlink(missing_ok=True)
    created = job._raw_status().get("created", time.time())
    base = {"pid": os.getpid(), "created": created, "method": job._raw_status().get("method") or spec.method}
    writer = _StatusWriter(folder, base)
    log_path = folder / LOG_FILE

    def log(msg: str, to_terminal: bool = True) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        if echo is None:
            print(line, flush=True)  # the worker's stdout is the job log
        else:
            with open(log_path, "a", encoding="utf-8") as fh:
                fh.write(line + "\n")
            if to_terminal:
                echo(msg)

    def progress(p: Progress) -> None:
        writer.update(p)
        # A terminal gets every phase change and every 10th training step.
        if echo is not None and (p.phase != "training" or p.step % 10 == 0 or p.step == p.total_steps):
            echo(p.line())

    def cancelled() -> bool:
        return event.is_set() or (folder / CANCEL_FILE).exists()

    writer.write({"state": "running", "message": "starting"})
    try:
        result = train(
            spec.config(),
            base=spec.base,
            data=spec.data,
            out=spec.out,
            resume=spec.resume,
            preset=spec.preset,
            progress=progress,
            cancel=cancelled,
            encoder=encoder,
            validator=validator,
            device=spec.device,
            log=log,
        )
        # Its last state before the lock goes: a reader that finds the lock free and the state still "running"
        # takes the run for dead (Job.status).
        writer.write({"state": result.status, "message": result.message})
    except HistolabError as exc:
        writer.write({"state": "failed", "message": str(exc)})
        log(f"failed: {exc}", to_terminal=False)  # the caller reports it (the CLI as its one-line error)
        raise
    except BaseException as exc:
        writer.write({"state": "failed", "message": f"{type(exc).__name__}: {exc} (see {log_path})"})
        log("".join(traceback.format_exception(exc)))
        raise
    finally:
        fcntl.flock(lock_fd, fcntl.LOCK_UN)
        os.close(lock_fd)
    return result


def _quiet_progress_bars() -> None:
    """Weight-loading progress bars would fill the job log with carriage-return noise."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


class _StatusWriter:
    def __init__(self, folder: Path, base: dict[str, Any]):
        self.folder = folder
        self.base = base
        self.last_write = 0.0
        self.last_phase = ""
        self.state: dict[str, Any] = {}

    def write(self, changes: dict[str, Any]) -> None:
        self.state.update(changes)
        _write_status(self.folder, {**self.base, **self.state})
        self.last_write = time.monotonic()

    def update(self, p: Progress) -> None:
        self.state["progress"] = p.to_dict()
        now = time.monotonic()
        if p.phase != self.last_phase or now - self.last_write >= STATUS_INTERVAL_S or p.step == p.total_steps:
            self.last_phase = p.phase
            self.write({"state": "running", "message": p.message})


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str), encoding="utf-8")
    os.replace(tmp, path)


def _write_status(folder: Path, d: dict[str, Any]) -> None:
    d = dict(d)
    d["updated"] = time.time()
    _write_json(folder / STATUS_FILE, d)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "run":
        print("usage: python -m histolab.training.jobs run JOB_FOLDER", file=sys.stderr)
        return 2
    import histolab  # noqa: F401  (torchvision shim before diffusers)

    event = threading.Event()
    # SIGTERM (e.g. the app shutting down its children) cancels cleanly: the state is saved first.
    signal.signal(signal.SIGTERM, lambda *_: event.set())
    try:
        result = run_job(Path(argv[1]), cancel_event=event)
    except HistolabError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0 if result.status == "done" else 3


if __name__ == "__main__":
    raise SystemExit(main())
