"""Waiting on states, never on the clock: a test polls for the state it needs and goes on the moment it is
reached, so a fast machine is not slowed and a loaded one is not failed. The deadline is only a guard
against a hang (minutes, far past any healthy run), and a failure says what state was reached instead."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")

# Seconds. A loaded two-core CI machine ran the slowest waits here in about a minute; ten leaves room.
GENEROUS = 600.0
# Milliseconds, for Playwright (its own default is 30 s, and 5 s for expect()).
GENEROUS_MS = int(GENEROUS * 1000)


def wait_until(
    predicate: Callable[[], T], describe_state: Callable[[], str], timeout: float = GENEROUS, poll: float = 0.2
) -> T:
    """``predicate()``'s first truthy value; AssertionError naming ``describe_state()`` after ``timeout``."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= end:
            raise AssertionError(f"still waiting after {timeout:.0f} s; the state reached: {describe_state()}")
        time.sleep(poll)


def join_all(threads: Iterable[threading.Thread], timeout: float = GENEROUS) -> None:
    """Join every thread; AssertionError naming those still alive after ``timeout`` (in all)."""
    threads = list(threads)
    end = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, end - time.monotonic()))
    alive = [t.name for t in threads if t.is_alive()]
    assert not alive, f"threads still running after {timeout:.0f} s: {alive}"


def finish_task(runner, task_id: str, timeout: float = GENEROUS):
    """A TaskRunner task's info once it has finished, woken by the runner's own change notices."""
    end = time.monotonic() + timeout
    info = runner.get(task_id)
    while not info.finished:
        if time.monotonic() >= end:
            raise AssertionError(f"task {task_id} still {info.state} after {timeout:.0f} s: {info}")
        info = runner.wait(task_id, 1.0)
    return info
