import subprocess
import sys
import time

from histolab.locks import lock_held

HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(60)
"""


def test_held_by_a_live_process_and_freed_when_it_is_killed(tmp_path):
    lock = tmp_path / "lock"
    assert not lock_held(lock)  # missing: nobody holds it
    assert not lock.exists()
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        assert lock_held(lock)
        assert lock_held(lock)  # checking does not take it over
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while lock_held(lock) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not lock_held(lock)  # kill -9 frees it: the kernel drops the flock with the process


def test_create_makes_a_free_lock_file(tmp_path):
    lock = tmp_path / "job" / "lock"
    lock.parent.mkdir()
    assert not lock_held(lock, create=True)
    assert lock.exists()
