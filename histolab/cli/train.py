"""``python -m histolab train``: train an adapter (LoRA, DreamBooth, textual inversion, hypernetwork, projector).

    python -m histolab train --preset tiny-lora --data bundled --out checkpoints/my-lora
    python -m histolab train --method lora --data DIR --preset tiny-lora --out checkpoints/NAME --max-steps 100
    python -m histolab train --out checkpoints/NAME --resume          # continue with the saved settings
    python -m histolab train --list-presets | --show-preset NAME

In the foreground (default) progress is printed and Ctrl-C cancels cleanly
(the state is saved; ``--resume`` continues). ``--background`` starts a job
process and returns; ``python -m histolab jobs`` follows it.
"""

from __future__ import annotations

import argparse
import os

NAME = "train"
HELP = "train an adapter (LoRA, DreamBooth, textual inversion, hypernetwork, foundation-embedding projector)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--method",
        default="",
        help="lora, dreambooth, textual_inversion (ti), hypernetwork or projector; implied by --preset",
    )
    parser.add_argument("--preset", default="", help="a named recipe (see --list-presets); --set changes its values")
    parser.add_argument(
        "--data",
        default=None,
        help="'bundled' (the bundled crops' train split; default for a new run) or a dataset: a folder of class "
        "subfolders (optionally under train/val/test), a Chaoyang-style JSON or a CSV with path,label[,split]",
    )
    parser.add_argument(
        "--base",
        default=None,
        help="base model: 'embedded' (default for a new run), a diffusers folder, a single-file checkpoint or a hub id",
    )
    parser.add_argument("--out", default="", help="folder to write the adapter to, e.g. checkpoints/NAME")
    parser.add_argument(
        "--max-steps", type=int, default=None, help="train this many optimiser steps (overrides epochs)"
    )
    parser.add_argument("--epochs", type=int, default=None, help="number of epochs (overrides the preset)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change one setting, e.g. --set lr=1e-4 --set rank=16 --set layer_structure=1,2,4,2,1 (repeatable)",
    )
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--background", action="store_true", help="run as a background job and return its id")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: a GPU when there is one)")
    parser.add_argument("--list-presets", action="store_true", help="list the named presets and exit")
    parser.add_argument("--show-preset", metavar="NAME", default=None, help="print a preset's values with reasons")


def _overrides(args) -> dict[str, str]:
    from histolab.errors import InvalidRequest

    out: dict[str, str] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InvalidRequest(f"--set {item!r}: expected KEY=VALUE, e.g. --set lr=1e-4")
        out[key.strip()] = value
    if args.max_steps is not None:
        out["max_steps"] = str(args.max_steps)
    if args.epochs is not None:
        out["epochs"] = str(args.epochs)
    return out


def _distributed(spec) -> int:
    """Under `accelerate launch`: every process trains its share; no job record (the launcher is the job)."""
    from histolab.training.loop import train

    spec.check()
    main = int(os.environ.get("RANK", "0")) == 0
    result = train(
        spec.config(),
        base=spec.base,
        data=spec.data,
        out=spec.out,
        resume=spec.resume,
        preset=spec.preset,
        device=spec.device,
        log=(lambda m: print(m, flush=True)) if main else None,
        progress=(lambda p: print(p.line(), flush=True) if p.phase != "training" or p.step % 10 == 0 else None)
        if main
        else None,
    )
    if main:
        print(result.message)
    return 0 if result.status == "done" else 130


def run(args: argparse.Namespace) -> int:
    import signal
    import threading

    from histolab.errors import InvalidRequest
    from histolab.training.presets import PRESETS, get_preset

    if args.list_presets:
        width = max(len(n) for n in PRESETS)
        for p in PRESETS.values():
            print(f"{p.name.ljust(width)}  {p.method:<17}  {p.summary}")
        return 0
    if args.show_preset:
        print("\n".join(get_preset(args.show_preset).describe()))
        return 0
    if not args.out:
        raise InvalidRequest("--out is required: the folder to write the adapter to, e.g. checkpoints/NAME")

    from histolab.training.jobs import JobSpec, JobStore, run_job

    spec = JobSpec(
        out=args.out,
        method=args.method,
        preset=args.preset,
        overrides=_overrides(args),
        base=args.base,
        data=args.data,
        resume=args.resume,
        device=args.device,
    )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _distributed(spec)
    store = JobStore()
    if args.background:
        job = store.start(spec)
        print(f"job {job.id} started: {job.dir}")
        print(f"follow it with `python -m histolab jobs watch {job.id}`; cancel with `... jobs cancel {job.id}`")
        return 0
    job = store.create(spec)
    event = threading.Event()

    def on_sigint(signum, frame):
        if event.is_set():
            raise KeyboardInterrupt
        print("cancelling: saving the state at the next step (Ctrl-C again to abort without saving)", flush=True)
        event.set()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        result = run_job(job.dir, echo=lambda line: print(line, flush=True), cancel_event=event)
    finally:
        signal.signal(signal.SIGINT, previous)
    print(f"{result.message} (job {job.id})")
    if result.status == "cancelled":
        print(f"resume with: python -m histolab train --out {result.out} --resume")
        return 130
    return 0
