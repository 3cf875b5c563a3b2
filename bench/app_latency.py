"""Latency of the live app while a training job runs, against the idle app, in the same run.

A real app (histolab.ui.build_app, launched as ``python app.py`` launches it) is driven through
gradio_client, one request at a time, in four phases:

1. idle: nothing else of ours runs;
2. training, every core each: a real training job (histolab.training.jobs, its own process, the
   tiny-lora preset on the same base) trains throughout the phase, it and the app each on torch's
   default threads (one per core), as before histolab.threads;
3. training, cores split: the same with the app's policy (histolab.threads): the job started on its
   share of the cores, the app on the rest while the job runs;
4. U-Net compiling: ``python -m histolab compile-unet`` compiles the base's U-Net from scratch in a
   process of its own, as the app starts it after its preload (nice 19, one thread).

Measured per request, client side (queue, handler, commit, response): a rater's answer submit on the
rater page (``/rater_submit``: validated, committed with synchronous=FULL, next task built with its
images) and a generate request (``/generate``: one image at the Generate tab's settings). Printed: n,
p50 and p99 in ms per phase, the training/idle ratios, and the job's steps/s in each training phase. The base model is the embedded default
when it is installed, else a random-init network of the same architecture (same shapes, same time).

    python bench/app_latency.py                       # 100 submits and 20 generations per phase
    python bench/app_latency.py --ratings 200 --generations 40 --steps 25
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ratings", type=int, default=100, help="rating submits per phase (default 100)")
    p.add_argument("--generations", type=int, default=20, help="generate requests per phase (default 20)")
    p.add_argument(
        "--no-compile-phase",
        dest="compile_phase",
        action="store_false",
        help="skip the phase measured while the U-Net compiles in the background (histolab.compiled_unet)",
    )
    p.add_argument("--steps", type=int, default=20, help="sampler steps per generated image (default 20)")
    p.add_argument("--arch", default="embedded", help="architecture when the embedded weights are absent")
    p.add_argument("--threads", type=int, default=0, help="torch threads in the app (0: torch's default)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    return p.parse_args(argv)


def base_model(arch: str):
    from histolab.config import EMBEDDED_BASE_DIR

    if arch == "embedded" and (EMBEDDED_BASE_DIR / "model_index.json").exists():
        from histolab.pipeline import load_base

        return load_base("embedded"), "embedded default (trained weights)"
    from histolab.embedded.random_init import random_base

    return random_base(arch, seed=0), f"random-init {arch} architecture (embedded weights not installed)"


def in_passing_thread(fn, *args):
    """``fn(*args)`` in a thread that ends when it returns."""
    import threading

    box = {}
    thread = threading.Thread(target=lambda: box.update(value=fn(*args)))
    thread.start()
    thread.join()
    return box["value"]


def make_study(services, n_tasks: int) -> str:
    """A study of real bundled crops with one rater; returns the rater's code."""
    from histolab.review import create_study, parse_config

    per_class = -(-n_tasks // 3)
    real = services.materialize_real("test")
    cfg = {
        "id": "latency",
        "owner": services.settings.admin_user,
        "image_size": 64,
        "sources": [{"name": "real", "kind": "real", "path": str(real), "limit": per_class}],
        "raters": ["r1"],
    }
    report = create_study(services.store(), parse_config(cfg))
    assert report.units >= n_tasks, report.lines()
    return report.raters["r1"]


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1000.0, q))


def measure(rater, view, gen_args, n_ratings: int, n_gen: int, client, check=None) -> tuple[dict, tuple]:
    """Alternate submits and generations (so both see the same conditions); returns latencies (s) and the view."""
    out = {"submit": [], "generate": []}
    shown = 29  # the hidden task id in the rater endpoints' outputs
    for i in range(max(n_ratings, n_gen)):
        if i < n_ratings:
            # task id, 12 scales, artefacts, judgement, how sure, 8 ranks, comment, 12 continuous aspects
            args = [view[shown], *[6] * 12, [], "real", 3, *[None] * 8, "", *[None] * 12]
            t = time.perf_counter()
            view = rater.predict(*args, api_name="/rater_submit")
            out["submit"].append(time.perf_counter() - t)
        if i < n_gen:
            t = time.perf_counter()
            client.predict(*gen_args, api_name="/generate")
            out["generate"].append(time.perf_counter() - t)
        if check is not None:
            check()
    return out, view


def training_phase(job, rater, view, gen_args, args, client) -> dict:
    """Wait until ``job`` trains, then measure the app's requests while it keeps training."""
    t0 = time.monotonic()
    while True:
        st = job.status()
        if st.state == "running" and st.progress.get("phase") == "training" and st.progress.get("step", 0) >= 3:
            break
        if st.finished or time.monotonic() - t0 > 600:
            raise SystemExit(f"the training job did not start training: {st}\n{job.log_tail()}")
        time.sleep(0.5)
    step0 = job.status().progress.get("step", 0)

    def still_training():
        st = job.status()
        if st.state != "running":
            raise SystemExit(f"the training job stopped during the phase: {st}\n{job.log_tail()}")

    t1 = time.monotonic()
    latency, view = measure(rater, view, gen_args, args.ratings, args.generations, client, still_training)
    seconds = time.monotonic() - t1
    st = job.status()
    return {
        "latency": latency,
        "view": view,
        "seconds": seconds,
        "steps": st.progress.get("step", 0) - step0,
        "rate": st.progress.get("samples_per_s"),
    }


def compile_phase(base_dir, cache, rater, view, gen_args, args, client) -> dict:
    """Measure while ``python -m histolab compile-unet`` compiles the base's U-Net from scratch, started as
    the app starts it after a preload (histolab.ui.services.start_unet_compile: nice 19, one thread)."""
    import os
    import subprocess

    from histolab.ui.services import CompileJob

    argv = [sys.executable, "-m", "histolab", "compile-unet", "--base", str(base_dir), "--dtype", "bfloat16"]
    argv = ["nice", "-n", "19", *argv, "--batches", "4,1", "--cache-dir", str(cache)]
    job = CompileJob(argv, cache / "build.log", {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    # The phase starts once the compiler runs (the export before it is the process loading and tracing).
    t0 = time.monotonic()
    while "cc1plus" not in subprocess.run(["ps", "-eo", "comm"], capture_output=True, text=True).stdout:
        if job.state != "compiling" or time.monotonic() - t0 > 600:
            raise SystemExit(f"the compile did not start: {job.state}\n{(cache / 'build.log').read_text()[-2000:]}")
        time.sleep(0.5)
    t1 = time.monotonic()
    latency, view = measure(rater, view, gen_args, args.ratings, args.generations, client)
    seconds = time.monotonic() - t1
    overlapped = job.state == "compiling"
    job.proc.terminate()
    job.thread.join()
    return {"latency": latency, "view": view, "seconds": seconds, "compiling_throughout": overlapped}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from gradio_client import Client

    import histolab  # noqa: F401  (torchvision repair first)
    from histolab.config import Paths
    from histolab.pipeline import save_pipeline_folder
    from histolab.threads import available_cores, split
    from histolab.training import JobSpec
    from histolab.ui import AppSettings, Services, build_app, launch_options

    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="histolab-latency-"))
    # The model's load and save run in a thread that ends before the app starts, as in `python app.py`
    # (whose main thread runs no torch work): a live thread that has run torch work keeps an OpenMP team,
    # which slows the app's network thread (histolab.torch_worker).
    model, model_note = in_passing_thread(base_model, args.arch)
    paths = Paths.from_env({"HISTOLAB_DATA_DIR": str(root)})
    base_dir = in_passing_thread(save_pipeline_folder, model, paths.checkpoints / "bench-base")  # for the job
    settings = AppSettings(max_steps=max(150, args.steps), local_admin=True)
    services = Services(settings, paths, model_loader=lambda source: model)
    code = make_study(services, 2 * args.ratings + 4)
    app = build_app(services)
    opts = launch_options(settings, services=services)
    opts.update(quiet=True, prevent_thread_lock=True)
    _, url, _ = app.launch(**opts)
    job = None
    try:
        client = Client(url, verbose=False)
        rater = Client(url, verbose=False)
        view = rater.predict("latency", "r1", code, api_name="/rater_sign_in")
        gen_args = ["embedded", "prompt", "an h&e stained histology image of skin", "", None]
        gen_args += ["(none)", 1.0] * settings.max_adapters + [args.steps, 7.5, "dpmpp_2m_karras", 0, 1, "(none)"]
        _, view = measure(rater, view, gen_args, 2, 2, client)  # the first calls open connections and caches
        idle, view = measure(rater, view, gen_args, args.ratings, args.generations, client)

        phases = {}
        for key, shared in (("every core each", False), ("cores split", True)):
            share = services.thread_share
            share.enabled = shared
            share.forget()
            job = services.jobs().start(
                JobSpec(
                    out=str(paths.checkpoints / f"latency-lora-{len(phases)}"),
                    preset="tiny-lora",
                    overrides={"max_steps": "1000000", "validation": "none", "samples_per_class": "0"},
                    base=str(base_dir),
                    data="bundled",
                    device="cpu",
                ),
                threads=share.job_threads(),
            )
            phases[key] = training_phase(job, rater, view, gen_args, args, client)
            view = phases[key]["view"]
            job.cancel()
            job.wait(timeout=300)
            job = None
        if args.compile_phase:
            phases["U-Net compiling"] = compile_phase(base_dir, root / "compiled", rater, view, gen_args, args, client)
            view = phases["U-Net compiling"]["view"]
    finally:
        if job is not None:
            job.cancel()
            job.wait(timeout=120)
        app.close()

    app_share, job_share = split(available_cores())
    print("app latency: one request at a time through gradio_client, against a live app")
    print(f"  cpu cores {available_cores()}, app torch threads {torch.get_num_threads()}; base: {model_note}")
    print(f"  generate: 1 image, {args.steps} steps, dpmpp_2m_karras, guidance 7.5, {model.default_size} px")
    print("  training phases: a tiny-lora job (own process) trains throughout, started")
    print("    'every core each': as before histolab.threads, job and app both on torch's default threads")
    print(
        f"    'cores split': the app's way now, the job on {job_share} thread(s), the app on {app_share} while it runs"
    )
    if "U-Net compiling" in phases:
        ph = phases["U-Net compiling"]
        print(
            "  'U-Net compiling': python -m histolab compile-unet (nice 19, one thread) compiles the base's U-Net "
            f"from scratch throughout ({ph['seconds']:.1f} s): "
            + ("it was still compiling at the end" if ph["compiling_throughout"] else "it ENDED before the phase did")
        )
    for key, ph in phases.items():
        if "steps" not in ph:
            continue
        rate = f" ({ph['rate']:.1f} img/s at the end)" if ph["rate"] else ""
        print(
            f"  job, {key}: {ph['steps']} steps in {ph['seconds']:.1f} s = {ph['steps'] / ph['seconds']:.2f} steps/s{rate}"
        )
    head = f"{'request':<22}{'n':>5}{'idle p50':>10}{'idle p99':>10}"
    for key in phases:
        head += f" | {key + ' p50':>22}{'p99':>9}{'x p50':>7}{'x p99':>7}"
    print(head)
    for name, label in (("submit", "rating submit (ms)"), ("generate", "generate (ms)")):
        a = idle[name]
        i50, i99 = percentile(a, 50), percentile(a, 99)
        line = f"{label:<22}{len(a):>5}{i50:>10.1f}{i99:>10.1f}"
        for ph in phases.values():
            b = ph["latency"][name]
            t50, t99 = percentile(b, 50), percentile(b, 99)
            line += f" | {t50:>22.1f}{t99:>9.1f}{t50 / i50:>7.2f}{t99 / i99:>7.2f}"
        print(line)
    if args.keep:
        print(f"kept {root}")
    else:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
