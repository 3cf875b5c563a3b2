import subprocess
import sys

from waiting import wait_until

from histolab.locks import lock_held

HOLD = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()  # held until killed (or the test closes its end), however slowly the test goes on
"""


def test_held_by_a_live_process_and_freed_when_it_is_killed(tmp_path):
    lock = tmp_path / "lock"
    assert not lock_held(lock)  # missing: nobody holds it
    assert not lock.exists()
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        assert lock_held(lock)
        assert lock_held(lock)  # checking does not take it over
    finally:
        proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()
    # kill -9 frees it: the kernel drops the flock with the process
    wait_until(lambda: not lock_held(lock), lambda: "the lock is still held after the holder was killed", poll=0.05)


def test_create_makes_a_free_lock_file(tmp_path):
    lock = tmp_path / "job" / "lock"
    lock.parent.mkdir()
    assert not lock_held(lock, create=True)
    assert lock.exists()
