"""The Train tab (admin): start a training job from a preset and a dataset, watch its loss and
per-epoch samples, cancel it, resume it, and list every job.

Jobs are processes of their own with their state on disk (histolab.training.jobs):
they go on when the browser closes or the app restarts, and the list is read
from disk whenever the page asks. ``JobMonitor`` samples the loss of running
jobs once a second into the job's folder (``loss.ui.jsonl``) so the curve is
there on return, even for the time nobody was watching.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path
from typing import Any

import gradio as gr

from histolab.errors import HistolabError, InvalidRequest
from histolab.ui.common import OnLoad, new_session, to_int, ui_errors

LOSS_FILE = "loss.ui.jsonl"
POLL_S = 1.0  # how often the monitor samples running jobs
MAX_POINTS = 5000  # loss points drawn (evenly thinned beyond this)


class JobMonitor:
    """A daemon thread that appends (step, loss) of every running job to its LOSS_FILE."""

    def __init__(self, jobs_factory, interval: float = POLL_S):
        self._jobs = jobs_factory
        self.interval = interval
        self._last: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> JobMonitor:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="histolab-job-monitor", daemon=True)
                self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(HistolabError, OSError, ValueError):
                self.sample()

    def sample(self) -> None:
        for job in self._jobs().list():
            st = job.status()
            if st.state != "running":
                continue
            p = st.progress or {}
            step, loss = p.get("step"), p.get("loss")
            if step is None or loss is None or self._last.get(job.id, -1) >= step:
                continue
            self._last[job.id] = step
            with open(job.dir / LOSS_FILE, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": step, "loss": loss, "epoch": p.get("epoch"), "t": time.time()}) + "\n")


def presets() -> list[tuple[str, str]]:
    from histolab.training import PRESETS

    return [(f"{name} — {p.summary}", name) for name, p in PRESETS.items()]


def datasets(services) -> list[str]:
    out = ["bundled"]
    root = services.datasets_root
    if root.is_dir():
        out += [p.name for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    return out


def parse_overrides(text: str) -> dict[str, str]:
    """``field = value`` lines (the CLI's ``--set field=value``); the training config parses and checks them."""
    out: dict[str, str] = {}
    for n, line in enumerate(str(text or "").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise InvalidRequest(f"overrides line {n} must be `field = value` but is {line[:80]!r}")
        out[key.strip()] = value.strip()
    return out


def start_job(
    services, session: dict, preset: str, dataset: str, base: str, name: str, max_steps, overrides_text: str = ""
) -> str:
    from histolab.review.config import SLUG
    from histolab.training import PRESETS, JobSpec

    services.auth.require_admin(session)
    if preset not in PRESETS:
        raise InvalidRequest(f"unknown preset {preset!r}")
    name = str(name or "").strip()
    if not SLUG.match(name) or name.startswith("embedded"):
        raise InvalidRequest(f"output name must be a short lowercase name not starting with 'embedded' but is {name!r}")
    if dataset not in datasets(services):
        raise InvalidRequest(f"unknown dataset {dataset!r}; put datasets in {services.datasets_root}")
    data = "bundled" if dataset == "bundled" else str(services.datasets_root / dataset)
    overrides: dict[str, Any] = parse_overrides(overrides_text)
    steps = to_int("max steps", max_steps if max_steps not in (None, "") else 0, 0, 10_000_000)
    if steps:
        overrides["max_steps"] = steps
    spec = JobSpec(
        out=str(services.paths.checkpoints / name),
        preset=preset,
        overrides=overrides,
        base=services.resolve_base(base),
        data=data,
        device=None if services.settings.device == "auto" else services.settings.device,
    )
    share = services.thread_share
    job = services.jobs().start(spec, python=services.job_python, threads=share.job_threads())
    share.forget()  # the next generation sees the new job at once
    _monitor(services)
    return job.id


def _monitor(services) -> None:
    if services.job_monitor is None:
        services.job_monitor = JobMonitor(services.jobs)
    services.job_monitor.start()


def job_rows(services) -> list[list[Any]]:
    from histolab.training.progress import Progress

    rows = []
    for job in reversed(services.jobs().list()):
        st = job.status()
        p = (
            Progress(**{k: v for k, v in st.progress.items() if k in Progress.__dataclass_fields__})
            if st.progress
            else None
        )
        rows.append([st.id, st.state, st.method, st.preset, Path(st.out).name, p.line() if p else "", st.message])
    return rows


def _job(services, job_id: str):
    job_id = str(job_id or "").strip()
    if not job_id or "/" in job_id or ".." in job_id:
        raise InvalidRequest("choose a job")
    return services.jobs().get(job_id)


def loss_points(job) -> list[dict[str, Any]]:
    """Two series: the mean loss of each finished epoch (from its checkpoint's manifest, so it is there after
    any restart) and the live moving mean the monitor sampled while the job ran."""
    from histolab.adapters.manifest import read_manifest
    from histolab.training.checkpoint import epoch_folders

    points = []
    for _, folder in sorted(epoch_folders(Path(job.spec().out)).items()):
        with contextlib.suppress(HistolabError, OSError, ValueError):
            m = read_manifest(folder)
            if m is not None and "train_loss" in m.metrics and "step" in m.metrics:
                points.append(
                    {"step": int(m.metrics["step"]), "loss": float(m.metrics["train_loss"]), "series": "epoch mean"}
                )
    live = []
    path = job.dir / LOSS_FILE
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError, ValueError):
                d = json.loads(line)
                live.append({"step": int(d["step"]), "loss": float(d["loss"]), "series": "moving mean (live)"})
    if len(live) > MAX_POINTS:
        k = len(live) / MAX_POINTS
        live = [live[int(i * k)] for i in range(MAX_POINTS)]
    return points + live


def epoch_samples(job) -> list[tuple[Any, str]]:
    from PIL import Image

    from histolab.training.checkpoint import epoch_folders

    out = []
    for epoch, folder in sorted(epoch_folders(Path(job.spec().out)).items()):
        png = folder / "samples.png"
        if png.is_file():
            with Image.open(png) as im:
                out.append((im.convert("RGB"), f"epoch {epoch}"))
    return out


def details(services, session: dict, job_id: str) -> dict[str, Any]:
    import pandas as pd

    services.auth.require_admin(session)
    job = _job(services, job_id)
    st = job.status()
    points = loss_points(job)
    frame = pd.DataFrame(points or [], columns=["step", "loss", "series"])
    return {
        "line": st.line(),
        "loss": frame,
        "samples": epoch_samples(job),
        "log": job.log_tail(40),
        "state": st.state,
    }


def cancel_job(services, session: dict, job_id: str) -> str:
    services.auth.require_admin(session)
    job = _job(services, job_id)
    job.cancel()
    return f"job {job.id}: cancel asked; it saves its state and the current adapter at the next step"


def resume_job(services, session: dict, job_id: str) -> str:
    services.auth.require_admin(session)
    job = _job(services, job_id)
    st = job.status()
    if st.state not in ("cancelled", "interrupted", "failed"):
        raise InvalidRequest(f"job {job.id} is {st.state}; only a cancelled, interrupted or failed job resumes")
    job.resume(python=services.job_python, threads=services.thread_share.job_threads())
    services.thread_share.forget()
    _monitor(services)
    return f"job {job.id} resumed from its last checkpoint"


# ------------------------------------------------------------------ the page


def build(services, session_state):
    available = True
    try:
        preset_choices = presets()
    except ImportError:
        available, preset_choices = False, []
    with gr.Column() as locked:
        gr.Markdown(
            "Training is for the admin: sign in as admin at the top of the page."
            if available
            else "Training is not available in this installation (histolab.training is missing)."
        )
    with gr.Column(visible=False) as panel:
        with gr.Accordion("Start a job", open=True):
            with gr.Row():
                preset = gr.Dropdown(
                    preset_choices, value=preset_choices[0][1] if preset_choices else None, label="Preset"
                )
                dataset = gr.Dropdown(allow_custom_value=True, choices=["bundled"], value="bundled", label="Dataset")
                base = gr.Dropdown(allow_custom_value=True, choices=[], label="Base model")
            with gr.Row():
                name = gr.Textbox(label="Adapter name (checkpoints/NAME)", value="my-adapter", elem_id="train-name")
                max_steps = gr.Number(value=0, precision=0, minimum=0, label="Max steps (0: the preset's)")
                start = gr.Button("Start", variant="primary", elem_id="train-start")
            overrides = gr.Textbox(
                label="Override preset settings (one `field = value` per line, e.g. `epochs = 4`)", lines=2, value=""
            )
            started = gr.Markdown("")
        with gr.Row():
            jobs = gr.Dropdown(allow_custom_value=True, choices=[], label="Job", elem_id="train-job")
            refresh = gr.Button("Refresh")
            cancel = gr.Button("Cancel", variant="stop")
            resume = gr.Button("Resume")
        table = gr.Dataframe(
            headers=["job", "state", "method", "preset", "adapter", "progress", "message"], interactive=False, wrap=True
        )
        line = gr.Markdown("", elem_id="train-line")
        with gr.Row():
            loss = gr.LinePlot(x="step", y="loss", color="series", title="Training loss", height=260)
            samples = gr.Gallery(label="Samples per epoch (fixed seeds)", columns=2, format="png")
        log = gr.Textbox(label="Log (last lines)", lines=8, interactive=False)
        timer = gr.Timer(2.0, active=False)

    def session(s):
        return s if isinstance(s, dict) else new_session()

    def lists(s, select=None):
        services.auth.require_admin(session(s))
        rows = job_rows(services)
        ids = [r[0] for r in rows]
        pick = select if select in ids else (ids[0] if ids else None)
        return rows, gr.update(choices=ids, value=pick)

    @ui_errors
    def on_start(s, p, d, b, n, m, o):
        job_id = start_job(services, session(s), p, d, b, n, m, o)
        rows, pick = lists(s, job_id)
        return f"started job {job_id}; it goes on if you close the page", rows, pick, gr.Timer(active=True)

    start.click(
        on_start,
        [session_state, preset, dataset, base, name, max_steps, overrides],
        [started, table, jobs, timer],
        api_name="train_start",
    )

    @ui_errors
    def on_refresh(s, current):
        rows, pick = lists(s, current)
        return rows, pick

    refresh.click(on_refresh, [session_state, jobs], [table, jobs], api_name="train_jobs")

    @ui_errors
    def on_details(s, job_id):
        if not job_id:
            return "", None, [], "", gr.Timer(active=False)
        d = details(services, session(s), job_id)
        return d["line"], d["loss"], d["samples"], d["log"], gr.Timer(active=d["state"] in ("queued", "running"))

    detail_out = [line, loss, samples, log, timer]
    jobs.change(on_details, [session_state, jobs], detail_out, api_name="train_job")
    timer.tick(on_details, [session_state, jobs], detail_out, api_visibility="private")

    @ui_errors
    def on_cancel(s, job_id):
        return cancel_job(services, session(s), job_id)

    @ui_errors
    def on_resume(s, job_id):
        msg = resume_job(services, session(s), job_id)
        return msg, gr.Timer(active=True)

    cancel.click(on_cancel, [session_state, jobs], [started], api_name="train_cancel")
    resume.click(on_resume, [session_state, jobs], [started, timer], api_name="train_resume")

    def on_page_load(s):
        if not available or not services.auth.is_admin(session(s)):
            return gr.update(visible=True), gr.update(visible=False), gr.update(), gr.update(), gr.update(), gr.update()
        rows, pick = lists(s)
        if any(r[1] == "running" for r in rows):
            _monitor(services)
        bases = [label for label, _ in services.base_choices()]
        return (
            gr.update(visible=False),
            gr.update(visible=True),
            gr.update(choices=datasets(services)),
            gr.update(choices=bases, value=bases[0]),
            rows,
            pick,
        )

    return OnLoad(on_page_load, [session_state], [locked, panel, dataset, base, table, jobs])
