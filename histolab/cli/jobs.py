"""``python -m histolab jobs``: list, follow, cancel and resume training jobs (state read from disk)."""

from __future__ import annotations

import argparse

NAME = "jobs"
HELP = "list, watch, cancel or resume training jobs (their state lives in the jobs dir)"
ACTIONS = ("list", "status", "watch", "log", "cancel", "resume")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", nargs="?", default="list", choices=ACTIONS, help="what to do (default: list)")
    parser.add_argument("job", nargs="?", default=None, help="the job id (all but list)")
    parser.add_argument(
        "--jobs-dir", default=None, help="jobs folder (default: jobs/ of the data dir, or $HISTOLAB_JOBS)"
    )
    parser.add_argument("--lines", type=int, default=40, help="log lines to show (log)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text (list, status)")


def run(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from histolab.errors import InvalidRequest
    from histolab.training.jobs import JobStore

    store = JobStore(args.jobs_dir)
    if args.action == "list":
        jobs = store.list()
        if args.json:
            for j in jobs:
                print(json.dumps(asdict(j.status()), sort_keys=True))
            return 0
        print(f"{store.root}: {len(jobs)} job{'s' if len(jobs) != 1 else ''}")
        for j in jobs:
            print(j.status().line())
        return 0
    if not args.job:
        raise InvalidRequest(f"`jobs {args.action}` needs a job id; `python -m histolab jobs list` lists them")
    job = store.get(args.job)
    if args.action == "status":
        st = job.status()
        print(json.dumps(asdict(st), sort_keys=True) if args.json else st.line())
        return 0
    if args.action == "log":
        print(job.log_tail(args.lines))
        return 0
    if args.action == "cancel":
        job.cancel()
        print(f"job {job.id}: cancel requested; it saves its state at the next step")
        return 0
    if args.action == "resume":
        job.resume()
        print(f"job {job.id} resumed in the background")
        return 0
    st = job.wait(callback=lambda s: print(s.line(), flush=True))
    return 0 if st.state == "done" else 3
