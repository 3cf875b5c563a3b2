"""Background jobs: a real worker process, cancelled through its folder, resumed, killed with SIGKILL,
resumed again, and finishing with exactly the weights of an uninterrupted run."""

import json
import os
import signal

import pytest
from training_testkit import max_state_difference, tiny_base_dir  # noqa: F401
from waiting import wait_until

from histolab.adapters.loader import locate, open_located
from histolab.errors import InvalidRequest
from histolab.training.jobs import JobSpec, JobStore
from histolab.training.state import load_state

# 12 images at batch 4: 3 steps per epoch; 16 epochs = 48 steps, long enough to interrupt twice.
SETTINGS = {
    "max_images_per_class": "4",
    "min_images_per_class": "2",
    "repeats": "1",
    "batch_size": "4",
    "augment": "flip",
    "validation": "none",
    "samples_per_class": "0",
    "epochs": "16",
}


def _wait_for(job, predicate):
    """The job's first status that satisfies ``predicate`` (a generous guard against a hang, no speed limit)."""

    def reached():
        st = job.status()
        if predicate(st):
            return st
        if st.finished:  # it will not change again by itself
            raise AssertionError(f"job {job.id} ended before the state waited for: {st}\n{job.log_tail()}")
        return None

    return wait_until(reached, lambda: f"job {job.id}: {job.status()}\n{job.log_tail()}")


def _finish(job):
    return _wait_for(job, lambda st: st.finished)


def test_cancel_kill_and_resume_a_job_process(tiny_base_dir, tmp_path):  # noqa: F811
    store = JobStore(tmp_path / "jobs")
    out = tmp_path / "checkpoints" / "bg-lora"
    spec = JobSpec(
        out=str(out), preset="tiny-lora", overrides=SETTINGS, base=str(tiny_base_dir), data="bundled", device="cpu"
    )
    job = store.start(spec)
    assert [j.id for j in store.list()] == [job.id]

    # 1. Cancel through the job folder while it trains: the worker saves and stops.
    _wait_for(job, lambda s: s.state == "running" and s.progress.get("step", 0) >= 4)
    job.cancel()
    st = _finish(job)
    assert st.state == "cancelled", job.log_tail()
    cancelled_at = load_state(out / "training").step
    assert cancelled_at >= 4 and open_located(locate(out)).kind == "lora"

    # 2. Resume in a new process, then kill -9 it mid-run: the status (from disk) says interrupted.
    job.resume()
    st = _wait_for(job, lambda s: s.state == "running" and s.progress.get("step", 0) >= cancelled_at + 7)
    os.kill(st.pid, signal.SIGKILL)
    st = _wait_for(job, lambda s: s.state == "interrupted")
    assert "resume" in st.message
    saved = load_state(out / "training")
    assert saved is not None and saved.step > cancelled_at  # the last epoch checkpoint before the kill survived
    assert open_located(locate(out)).kind == "lora"  # and the folder's adapter is intact

    # 3. Resume again to the end.
    job.resume()
    st = _finish(job)
    assert st.state == "done", job.log_tail()
    assert json.loads((job.dir / "status.json").read_text())["progress"]["step"] == 48

    # The same weights, bit for bit, as one uninterrupted job (a worker process too: float sums depend on
    # torch's thread count, which a fresh process picks for itself, so the reference runs the same way).
    ref = store.start(JobSpec(**{**spec.__dict__, "out": str(tmp_path / "ref")}))
    assert _finish(ref).state == "done", ref.log_tail()
    assert max_state_difference(load_state(tmp_path / "ref" / "training"), load_state(out / "training")) == 0.0


def test_invalid_settings_are_refused_before_a_process_starts(tmp_path):
    store = JobStore(tmp_path / "jobs")
    with pytest.raises(InvalidRequest, match=r"`lr` must be a positive number but is -0\.1"):
        store.start(JobSpec(out=str(tmp_path / "o"), preset="tiny-lora", overrides={"lr": "-0.1"}))
    with pytest.raises(InvalidRequest, match="preset 'tiny-lora' is for method 'lora', not 'hypernetwork'"):
        store.start(JobSpec(out=str(tmp_path / "o"), preset="tiny-lora", method="hypernetwork"))
    with pytest.raises(InvalidRequest, match="no such folder"):
        store.start(JobSpec(out=str(tmp_path / "o"), preset="tiny-lora", data=str(tmp_path / "missing")))
    assert store.list() == [] and not (tmp_path / "o").exists()


def test_a_run_writes_its_last_state_before_it_lets_go_of_the_lock(tiny_base_dir, tmp_path, monkeypatch):  # noqa: F811
    """A reader that finds the lock free and the state "running" takes the run for dead (Job.status). So the
    run's final state must be on disk before the lock is released, or a reader in between sees a finished
    (here: cancelled) job as interrupted. Checked at the moment of the unlock itself."""
    import fcntl

    from histolab.training import jobs

    store = JobStore(tmp_path / "jobs")
    spec = JobSpec(
        out=str(tmp_path / "checkpoints" / "fg-lora"),
        preset="tiny-lora",
        overrides={**SETTINGS, "epochs": "1"},
        base=str(tiny_base_dir),
        data="bundled",
        device="cpu",
    )
    job = store.create(spec)
    seen = []
    real_flock = fcntl.flock

    def flock(fd, op):
        if op == fcntl.LOCK_UN:
            seen.append(json.loads((job.dir / "status.json").read_text())["state"])
        return real_flock(fd, op)

    monkeypatch.setattr(jobs.fcntl, "flock", flock)
    cancel = __import__("threading").Event()
    cancel.set()  # cancelled at its first step: the quickest way to a final state
    jobs.run_job(job.dir, echo=lambda line: None, cancel_event=cancel)
    assert seen == ["cancelled"]
    assert job.status().state == "cancelled"
