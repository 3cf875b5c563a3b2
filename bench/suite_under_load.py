"""The test suite under load: `.ci/run` from a fresh clone, several times in a row, beside CPU hogs.

Issue 15's check that a busy machine cannot break the suite. Clones the current commit (HEAD, committed
work only, as CI sees it) into a temporary folder, starts ``--hogs`` CPU-bound processes (one busy
single-threaded matrix loop each, as bench/review_load.py makes them; two fill this 2-core machine), and
runs ``bash .ci/run`` ``--runs`` times one after another in that clone, each from the same fresh clone
(the first run also pays for the install, as CI does). Prints, per run, its wall time, exit code and
pytest's closing line, then the hogs' share of the machine. ``--hogs 0`` gives the idle time.

    python bench/suite_under_load.py --runs 3 --hogs 2
    python bench/suite_under_load.py --runs 1 --hogs 0
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUMMARY = re.compile(r"^=*\s*(\d+ (passed|failed).*) in [\d.]+s.*$")


def _hog(stop) -> None:
    # Plain Python + numpy-free arithmetic: no thread pool of its own, exactly one core's worth of work.
    x = 1.0001
    while not stop.is_set():
        for _ in range(200_000):
            x = x * 1.0000001 % 7.0 + 1.0


def _closing_line(text: str) -> str:
    for line in reversed(text.splitlines()):
        m = SUMMARY.match(line.strip())
        if m:
            return line.strip().strip("= ")
    return "(no pytest closing line)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="consecutive .ci/run runs in the same fresh clone")
    ap.add_argument("--hogs", type=int, default=os.cpu_count() or 2, help="CPU-hog processes beside the suite")
    ap.add_argument("--keep", action="store_true", help="keep the clone and the logs")
    ap.add_argument("--log-dir", default=None, help="where each run's output goes (default: inside the clone)")
    args = ap.parse_args(argv)

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
    commit = commit.stdout.strip()
    work = Path(tempfile.mkdtemp(prefix="histolab-suite-"))
    clone = work / "histolab"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    subprocess.run(["git", "checkout", "-q", commit], cwd=clone, check=True)
    logs = Path(args.log_dir) if args.log_dir else work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"fresh clone of {commit[:10]} in {clone}; {args.hogs} CPU hog(s) on {os.cpu_count()} core(s)", flush=True)

    stop = mp.Event()
    hogs = [mp.Process(target=_hog, args=(stop,), daemon=True) for _ in range(args.hogs)]
    for p in hogs:
        p.start()
    results = []
    try:
        for i in range(1, args.runs + 1):
            env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
            env["CI"] = "true"
            t0 = time.monotonic()
            cpu0 = os.times()
            proc = subprocess.run(
                ["bash", ".ci/run"], cwd=clone, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True
            )
            wall = time.monotonic() - t0
            cpu1 = os.times()
            out = proc.stdout + proc.stderr
            (logs / f"run-{i}.log").write_text(out)
            line = _closing_line(out)
            child_cpu = (cpu1.children_user - cpu0.children_user) + (cpu1.children_system - cpu0.children_system)
            results.append((i, wall, proc.returncode, line))
            print(
                f"run {i}: {wall:.0f} s wall ({wall / 60:.1f} min), rc={proc.returncode}, suite CPU {child_cpu:.0f} s: {line}",
                flush=True,
            )
    finally:
        stop.set()
        for p in hogs:
            p.join(5)
            if p.is_alive():
                p.terminate()
    with open("/proc/loadavg") as f:
        print(f"load average at the end: {f.read().split()[:3]}")
    ok = all(rc == 0 for _, _, rc, _ in results)
    print(f"{sum(rc == 0 for _, _, rc, _ in results)} of {len(results)} runs passed; logs in {logs}")
    if not args.keep and ok and not args.log_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
