"""Load test of the review store: concurrent raters submitting while a CPU-heavy job runs.

N raters (half threads in this process, half separate processes, each with its
own connections) each answer M tasks of a study; one submit in five is a
double click (the same submission fired twice at once from two threads). This
runs twice on fresh, identical studies: first on the machine as it is
("idle": no job of ours), then while CPU-hog processes (one per core, each a
torch matmul loop on one thread, like a training job) keep every core busy.

It prints, per phase: ratings acknowledged (submits that returned a new ack),
submissions stored, duplicates (must be 0), and the p50/p99 latency of submit
(the call that returns only after the commit is on disk) and of next_task,
then the loaded/idle latency ratios. Exit status 1 if acknowledged != stored
or any duplicate was found.

The images are real bundled crops and recipe-carrying PNGs written like the
generator's (their pixels do not matter to the store).

    python bench/review_load.py                     # defaults: 4 thread + 4 process raters x 40 ratings
    python bench/review_load.py --threads 8 --processes 8 --ratings 60
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from histolab.data.prompts import CLASS_PROMPTS
from histolab.recipe import Recipe, save_png
from histolab.review import Answers, Store, create_study, next_task, parse_config, submit

DOUBLE_CLICK = 0.2  # share of submits sent twice at once


def make_sources(root: Path, per_class: int) -> Path:
    from histolab.data.bundled import materialize

    materialize(root / "real", split="test", per_class=per_class, stride=16)
    for j, model in enumerate(("model-a", "model-b")):
        d = root / model
        d.mkdir(parents=True)
        for k, (_cls, prompt) in enumerate(CLASS_PROMPTS.items()):
            for i in range(per_class):
                rng = np.random.default_rng([j, k, i])
                arr = np.clip(rng.integers(80, 220, (1, 1, 3)) + rng.normal(0, 30, (64, 64, 3)), 0, 255).astype(
                    np.uint8
                )
                save_png(
                    Image.fromarray(arr),
                    Recipe(base_model=model, base_hash="0" * 64, prompt=prompt, seed=i),
                    d / f"{k}_{i}.png",
                )
    return root


def build_study(root: Path, sources: Path, study_id: str, raters: list[str], queue: bool) -> Store:
    store = Store(root, queue_writers=queue)
    cfg = {
        "id": study_id,
        "owner": "bench",
        "image_size": 128,
        "prompts": dict(CLASS_PROMPTS),
        "sources": [
            {"name": "real", "kind": "real", "path": str(sources / "real"), "classes": "subfolders"},
            {"name": "model-a", "kind": "generated", "path": str(sources / "model-a")},
            {"name": "model-b", "kind": "generated", "path": str(sources / "model-b")},
        ],
        "raters": raters,
    }
    create_study(store, parse_config(cfg))
    return store


def rate(store: Store, study_id: str, rater: str, m: int, seed: int) -> dict:
    """Answer up to m tasks; return latencies and how many submits were newly acknowledged."""
    rng = np.random.default_rng(seed)
    submit_ms, next_ms, acked, dup_acks, errors = [], [], 0, 0, []
    lock = threading.Lock()
    for _ in range(m):
        t0 = time.perf_counter()
        task = next_task(store, study_id, rater)
        next_ms.append((time.perf_counter() - t0) * 1000)
        if task is None:
            break
        a = Answers(
            scores={x.key: int(rng.integers(0, 11)) for x in task.aspects},
            artefacts=tuple(x.key for x in task.artefacts if rng.random() < 0.2),
            judgement=("real", "synthetic")[int(rng.integers(0, 2))],
            confidence=int(rng.integers(1, 6)),
            time_ms=int(rng.integers(2000, 30000)),
        )
        sid = str(uuid.uuid4())
        results = []

        def click(a=a, sid=sid, task=task, results=results):
            t = time.perf_counter()
            try:
                ack = submit(store, study_id, rater, task.task_id, a, sid)
            except Exception as exc:  # reported: a failed submit is a bench failure, not noise
                with lock:
                    errors.append(repr(exc))
                return
            with lock:
                results.append((ack.duplicate, (time.perf_counter() - t) * 1000))

        if rng.random() < DOUBLE_CLICK:
            other = threading.Thread(target=click)
            other.start()
            click()
            other.join()
        else:
            click()
        for dup, ms in results:
            submit_ms.append(ms)
            acked += not dup
            dup_acks += dup
    return {"submit_ms": submit_ms, "next_ms": next_ms, "acked": acked, "dup_acks": dup_acks, "errors": errors}


def _process_rater(
    root: str, study_id: str, rater: str, m: int, seed: int, out: mp.Queue, go: mp.Event, queue_writers: bool
) -> None:
    store = Store(root, queue_writers=queue_writers)  # this process's own connections
    go.wait()
    out.put(rate(store, study_id, rater, m, seed))


def _hog(stop: mp.Event) -> None:
    import torch

    torch.set_num_threads(1)
    a = torch.randn(256, 256)
    while not stop.is_set():
        for _ in range(20):
            a = torch.tanh(a @ a.T / 256)


def run_phase(
    root: Path, sources: Path, name: str, n_threads: int, n_procs: int, m: int, hogs: int, queue_writers: bool
) -> dict:
    study_id = f"load-{name}"
    raters = [f"t{i}" for i in range(n_threads)] + [f"p{i}" for i in range(n_procs)]
    store = build_study(root, sources, study_id, raters, queue_writers)
    ctx = mp.get_context("fork")  # before any rater thread exists in this process
    stop = ctx.Event()
    hog_procs = [ctx.Process(target=_hog, args=(stop,), daemon=True) for _ in range(hogs)]
    for p in hog_procs:
        p.start()
    if hogs:
        time.sleep(2.0)  # let the hogs reach full speed
    out: mp.Queue = ctx.Queue()
    go = ctx.Event()
    procs = [
        ctx.Process(target=_process_rater, args=(str(root), study_id, r, m, 1000 + i, out, go, queue_writers))
        for i, r in enumerate(raters[n_threads:])
    ]
    for p in procs:
        p.start()
    results: list[dict] = []
    res_lock = threading.Lock()

    def thread_rater(r: str, seed: int) -> None:
        res = rate(store, study_id, r, m, seed)
        with res_lock:
            results.append(res)

    threads = [threading.Thread(target=thread_rater, args=(r, i)) for i, r in enumerate(raters[:n_threads])]
    t0 = time.perf_counter()
    go.set()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for _ in procs:
        try:
            results.append(out.get(timeout=600))
        except queue.Empty:
            results.append(
                {
                    "submit_ms": [],
                    "next_ms": [],
                    "acked": 0,
                    "dup_acks": 0,
                    "errors": ["a rater process gave no result"],
                }
            )
    for p in procs:
        p.join()
    wall = time.perf_counter() - t0
    stop.set()
    for p in hog_procs:
        p.join(timeout=10)

    db = Store(root).db
    stored = db.execute("SELECT COUNT(*) FROM submissions WHERE study_id = ?", [study_id]).fetchone()[0]
    pairs = db.execute(
        "SELECT COUNT(DISTINCT unit_id || '/' || rater_id) FROM submissions WHERE study_id = ?", [study_id]
    ).fetchone()[0]
    dup_ratings = db.execute(
        "SELECT COUNT(*) FROM (SELECT 1 FROM ratings WHERE study_id = ? GROUP BY unit_id, rater_id, aspect HAVING COUNT(*) > 1)",
        [study_id],
    ).fetchone()[0]
    n_aspects = db.execute("SELECT COUNT(*) FROM aspects WHERE study_id = ?", [study_id]).fetchone()[0]
    n_ratings = db.execute("SELECT COUNT(*) FROM ratings WHERE study_id = ?", [study_id]).fetchone()[0]
    sub_ms = np.concatenate([r["submit_ms"] for r in results]) if results else np.array([])
    nxt_ms = np.concatenate([r["next_ms"] for r in results]) if results else np.array([])
    return {
        "phase": name,
        "acked": sum(r["acked"] for r in results),
        "dup_acks": sum(r["dup_acks"] for r in results),
        "stored": stored,
        # A duplicate: a second submission row for one (task, rater), or a second current rating of one aspect.
        "duplicates": (stored - pairs) + dup_ratings,
        "ratings_ok": n_ratings == stored * n_aspects,
        "errors": [e for r in results for e in r["errors"]],
        "p50": float(np.percentile(sub_ms, 50)),
        "p99": float(np.percentile(sub_ms, 99)),
        "next_p50": float(np.percentile(nxt_ms, 50)),
        "next_p99": float(np.percentile(nxt_ms, 99)),
        "wall": wall,
        "submits": int(sub_ms.size),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=4, help="raters running as threads of this process")
    ap.add_argument("--processes", type=int, default=4, help="raters running as separate processes")
    ap.add_argument("--ratings", type=int, default=40, help="tasks each rater answers")
    ap.add_argument("--hogs", type=int, default=os.cpu_count() or 2, help="CPU-hog processes in the loaded phase")
    ap.add_argument("--keep", action="store_true", help="keep the temporary store")
    ap.add_argument(
        "--no-queue",
        action="store_true",
        help="leave writers to SQLite's busy handler instead of the store's writer queue (for comparison)",
    )
    args = ap.parse_args(argv)

    per_class = max(2, -(-args.ratings // 9))  # 3 sources x 3 classes x per_class >= ratings
    tmp = Path(tempfile.mkdtemp(prefix="histolab-review-load-"))
    try:
        sources = make_sources(tmp / "sources", per_class)
        n = args.threads + args.processes
        shape = (args.threads, args.processes, args.ratings)
        print(
            f"review load bench: {args.threads} thread + {args.processes} process raters x {args.ratings} ratings, "
            f"{DOUBLE_CLICK:.0%} double clicks; loaded phase: {args.hogs} CPU-hog process(es) on {os.cpu_count()} core(s); "
            f"load average before: {os.getloadavg()[0]:.2f}; writers queued: {not args.no_queue}"
        )
        phases = [
            run_phase(tmp / "idle", sources, "idle", *shape, 0, not args.no_queue),
            run_phase(tmp / "loaded", sources, "loaded", *shape, args.hogs, not args.no_queue),
        ]
        print(
            f"{'phase':<8}{'acknowledged':>13}{'stored':>8}{'duplicates':>11}{'dup acks':>9}"
            f"{'submit p50 ms':>14}{'submit p99 ms':>14}{'next p50 ms':>12}{'next p99 ms':>12}{'wall s':>8}"
        )
        for p in phases:
            print(
                f"{p['phase']:<8}{p['acked']:>13}{p['stored']:>8}{p['duplicates']:>11}{p['dup_acks']:>9}"
                f"{p['p50']:>14.2f}{p['p99']:>14.2f}{p['next_p50']:>12.2f}{p['next_p99']:>12.2f}{p['wall']:>8.1f}"
            )
        idle, loaded = phases
        print(
            f"ratio loaded/idle: submit p50 x{loaded['p50'] / idle['p50']:.2f}, submit p99 x{loaded['p99'] / idle['p99']:.2f}, "
            f"next_task p50 x{loaded['next_p50'] / idle['next_p50']:.2f}"
        )
        ok = True
        for p in phases:
            expected = n * args.ratings
            bad = p["acked"] != p["stored"] or p["acked"] != expected or p["duplicates"] or p["errors"]
            if bad or not p["ratings_ok"]:
                ok = False
                print(
                    f"FAIL {p['phase']}: acknowledged {p['acked']} (expected {expected}), stored {p['stored']}, "
                    f"duplicates {p['duplicates']}, rating rows complete {p['ratings_ok']}, errors {p['errors'][:3]}"
                )
        print("acknowledged == stored, 0 duplicates: " + ("yes" if ok else "NO"))
        return 0 if ok else 1
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
