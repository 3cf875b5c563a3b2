"""How the app and the training jobs it starts share the CPU cores.

torch runs one OpenMP thread per core by default. Two such processes on the same cores do not share
them gracefully: an OpenMP parallel region waits for its slowest thread, and a thread that lost its core
to the other process holds up every step. Measured on a 2-core machine (issue 15): 20 passes of the
embedded U-Net took 2.0 s with one thread against 17.9-28.4 s with two while another process was busy.
The app generating while a job it started trains is exactly that pair. So while a job runs, the app
and the job split the cores (the job gets half, rounded up; the app the rest; at least one each), and
the app takes every core back once no job runs. bench/app_latency.py measures both ways in one run.

CPU kernels split their sums by thread, so in float32 an image made while a job trains may differ from
the same seed's image made with every core by rounding: measured on the embedded default (10 steps,
batch 2), at most 1 level of 255 in float32 and none in bfloat16 (the ``auto`` dtype on CPUs with
avx512_bf16).

An OMP_NUM_THREADS set by the user is respected: it is the app's "every core", and a job started with
it in the environment keeps it.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable


def available_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one, e.g. a container's cpuset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def user_threads(env=None) -> int | None:
    """OMP_NUM_THREADS when it is set to a whole number above 0, else None."""
    value = (os.environ if env is None else env).get("OMP_NUM_THREADS", "")
    return int(value) if value.strip().isdigit() and int(value) > 0 else None


def _torch_set_num_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def split(cores: int) -> tuple[int, int]:
    """(app threads, job threads) while a job trains beside the app."""
    job = max(1, (cores + 1) // 2)
    return max(1, cores - job), job


def job_environment(env: dict[str, str], threads: int | None) -> dict[str, str]:
    """``env`` for a job process given ``threads`` of its own; the user's own setting wins."""
    if threads is None or "OMP_NUM_THREADS" in env:
        return env
    return {**env, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


class ThreadShare:
    """The app's side: ``apply()`` in the thread that is about to run a network sets torch's threads to
    the app's share while a job is running, else to all of them. Whether a job runs is asked of
    ``jobs_running`` at most every ``recheck_s`` seconds (it reads the jobs folder)."""

    def __init__(
        self,
        jobs_running: Callable[[], bool],
        *,
        cores: int | None = None,
        full: int | None = None,
        enabled: bool = True,
        recheck_s: float = 1.0,
        set_threads: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._jobs_running = jobs_running
        # From the environment, not torch.get_num_threads(): that reads a process-wide default other
        # threads change for a moment (one_thread below).
        self.full = full or user_threads() or available_cores()
        self.app, self.job = split(cores or available_cores())
        self.app = min(self.app, self.full)
        self.enabled = enabled
        self._recheck_s = recheck_s
        self._set = set_threads or _torch_set_num_threads
        self._clock = clock
        self._lock = threading.Lock()
        self._checked = float("-inf")
        self._busy = False

    def job_threads(self) -> int | None:
        """Threads for a job the app starts now (None: leave the job to torch's default)."""
        return self.job if self.enabled else None

    def apply(self) -> int:
        """Set this thread's torch threads for the current state; returns the count set."""
        with self._lock:
            now = self._clock()
            if now - self._checked >= self._recheck_s:
                self._busy = self.enabled and bool(self._jobs_running())
                self._checked = now
            n = self.app if self._busy else self.full
        # torch keeps the count per OS thread once a thread has run parallel work, so it is set here, in
        # the thread that runs the networks, not once for the process.
        self._set(n)
        return n

    def forget(self) -> None:
        """Look at the jobs again on the next ``apply`` (a job was just started or stopped)."""
        with self._lock:
            self._checked = float("-inf")


@contextlib.contextmanager
def one_thread():
    """Small torch work outside the network thread (histolab.torch_worker) on this thread alone: an
    adapter file's tensors checked while the page is built, a tiny downstream classifier. The thread
    then starts no OpenMP team of its own; torch keeps the count per thread, so the network thread is
    unaffected. Restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
