"""The app and the training jobs it starts split the CPU cores (histolab.threads)."""

import fcntl
import os
import threading

from app_testkit import make_settings

from histolab.config import Paths
from histolab.threads import ThreadShare, job_environment, split
from histolab.ui.services import Services


def test_split_gives_each_side_at_least_one_core_and_the_job_the_larger_half():
    assert split(1) == (1, 1)
    assert split(2) == (1, 1)
    assert split(3) == (1, 2)
    assert split(4) == (2, 2)
    assert split(16) == (8, 8)


def test_a_job_gets_its_share_unless_the_user_set_the_threads():
    assert job_environment({"PATH": "/bin"}, 3) == {"PATH": "/bin", "OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3"}
    assert job_environment({"OMP_NUM_THREADS": "6"}, 3) == {"OMP_NUM_THREADS": "6"}
    assert job_environment({"PATH": "/bin"}, None) == {"PATH": "/bin"}


def test_the_app_uses_its_share_while_a_job_runs_and_every_core_after():
    running, calls, now = [False], [], [0.0]
    share = ThreadShare(
        lambda: calls.append("asked") or running[0],
        cores=4,
        full=4,
        set_threads=calls.append,
        clock=lambda: now[0],
    )
    assert share.apply() == 4 and share.job_threads() == 2
    running[0] = True
    now[0] = 0.5
    assert share.apply() == 4  # asked at most once a second: the jobs folder is read on a request's path
    now[0] = 1.0
    assert share.apply() == 2
    running[0] = False
    share.forget()  # e.g. the app just started or stopped a job
    assert share.apply() == 4
    assert calls == ["asked", 4, 4, "asked", 2, "asked", 4]


def test_a_user_thread_limit_caps_the_app_and_switching_off_restores_the_old_behaviour():
    share = ThreadShare(lambda: True, cores=16, full=3, set_threads=lambda n: None)
    assert share.apply() == 3  # OMP_NUM_THREADS=3: never more than the user asked for
    off = ThreadShare(lambda: True, cores=4, full=4, enabled=False, set_threads=lambda n: None)
    assert off.apply() == 4 and off.job_threads() is None


def test_the_app_sees_a_running_job_by_its_lock_and_generates_on_its_share(tmp_path, tiny_model):
    from histolab.generation import GenerationRequest
    from histolab.ui.generate import run

    services = Services(
        make_settings(), Paths.from_env({"HISTOLAB_DATA_DIR": str(tmp_path)}), model_loader=lambda s: tiny_model
    )
    job_dir = services.paths.jobs / "job-1"
    job_dir.mkdir(parents=True)
    (job_dir / "job.json").write_text("{}")
    assert services.jobs_running() is False
    seen = []
    services._thread_share = ThreadShare(
        services.jobs_running, cores=2, full=2, set_threads=lambda n: seen.append((n, threading.get_ident()))
    )
    fd = os.open(job_dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # what a job's worker holds while it trains
        assert services.jobs_running() is True
        out = []
        worker = threading.Thread(
            target=lambda: out.append(run(services, "embedded", GenerationRequest(prompt="x", steps=1)))
        )
        worker.start()
        worker.join()
    finally:
        os.close(fd)
    assert len(out) == 1 and len(out[0]) == 1
    # Set on the app's network thread before its work (the load, then the generation), not in the
    # request's thread: torch keeps the count per thread.
    network = services.torch._thread
    assert network is not None and network.ident != worker.ident
    assert seen and seen == [(1, network.ident)] * len(seen)
    services.thread_share.forget()
    services.torch.call(lambda: None)
    assert seen[-1] == (2, network.ident) and services.jobs_running() is False


def test_a_job_process_gets_its_share_in_its_environment(tmp_path, monkeypatch):
    """The worker's environment carries the share; torch in that process reads it at start."""
    import subprocess

    from histolab.training import jobs as jobs_module

    envs = []

    class FakePopen:
        def __init__(self, args, env, **kw):
            envs.append(env)

    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    folder = tmp_path / "job"
    folder.mkdir()
    jobs_module.spawn(folder, threads=1)
    jobs_module.spawn(folder)
    assert envs[0]["OMP_NUM_THREADS"] == "1" and envs[0]["MKL_NUM_THREADS"] == "1"
    assert "OMP_NUM_THREADS" not in envs[1]


def test_the_apps_full_count_comes_from_the_environment():
    from histolab.threads import available_cores, user_threads

    assert user_threads({"OMP_NUM_THREADS": "3"}) == 3
    assert user_threads({"OMP_NUM_THREADS": "0"}) is None and user_threads({"OMP_NUM_THREADS": "x"}) is None
    assert user_threads({}) is None
    assert ThreadShare(lambda: False, set_threads=lambda n: None).full == (user_threads() or available_cores())
