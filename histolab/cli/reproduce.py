"""``python -m histolab reproduce PAPER``: a paper's whole protocol (trainings, choice, test set, table)."""

from __future__ import annotations

import sys
from pathlib import Path

NAME = "reproduce"
HELP = "Reproduce a paper's protocol in one command: every training, the choice, the test set, the table."


def add_arguments(p) -> None:
    from histolab.reproduce.plan import PAPERS

    p.add_argument("paper", choices=PAPERS, help="which paper: colon-2025, uni2h-2026 or cxr-2025")
    p.add_argument(
        "--data", default="bundled", help="training dataset: folder, CSV or JSON (default: the bundled crops)"
    )
    p.add_argument("--base", default="embedded", help="base model: SD 1.5 folder or file (default: embedded)")
    p.add_argument("--encoder", default=None, help="uni2h-2026: the UNI2-h weights file (else the usual place)")
    p.add_argument(
        "--test", default=None, help="test set (folder, CSV, JSON or bundled:test; default: the dataset's test split)"
    )
    p.add_argument(
        "--inception-head",
        default=None,
        help="cxr-2025's IS: the Inception 1008-class softmax weights file (torch-fidelity's "
        "weights-inception-2015-12-05-6726825d.pth or pytorch-fid's pt_inception-2015-12-05-6726825d.pth)",
    )
    p.add_argument("--out", default=None, help="output folder (state, runs, generations, table); required to run")
    p.add_argument("--dry-run", action="store_true", help="print the plan (runs, steps, GPU hours); train nothing")
    p.add_argument("--smoke", action="store_true", help="tiny scale: the whole pipeline in minutes on a CPU")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--only-runs", default=None, help="comma-separated run ids of the plan to do (default: every run)")
    p.add_argument(
        "--stop-after", type=int, default=None, help="stop after N stages (work in slices; rerun to continue)"
    )


def run(args) -> int:
    import torch

    from histolab.errors import InvalidRequest
    from histolab.reproduce.plan import build_plan
    from histolab.reproduce.processes import from_env
    from histolab.reproduce.run import Reproduction, Stopped, dataset_counts

    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    label_names = "chaoyang" if args.paper == "colon-2025" and args.data != "bundled" else ""
    counts = dataset_counts(args.data, args.test, label_names)
    extra = {"label_names": ""} if args.data == "bundled" else {}  # the bundled crops have names already
    plan = build_plan(
        args.paper,
        counts,
        smoke=args.smoke,
        cuda=cuda,
        encoder=args.encoder,
        extra=extra,
        only_runs=[x.strip() for x in args.only_runs.split(",") if x.strip()] if args.only_runs else None,
    )
    if args.dry_run:
        print("\n".join(plan.lines()))
        return 0
    if not args.out:
        raise InvalidRequest("--out DIR is needed to run (or pass --dry-run to see the plan)")
    if "IS" in plan.metrics and not args.inception_head and not args.smoke:
        raise InvalidRequest(
            f"{args.paper} reports the Inception Score, which needs the Inception 1008-class head: pass "
            "--inception-head with torch-fidelity's weights-inception-2015-12-05-6726825d.pth (github.com/toshas/"
            "torch-fidelity releases) or pytorch-fid's pt_inception-2015-12-05-6726825d.pth (github.com/mseitzer/"
            "pytorch-fid releases)"
        )
    procs = from_env(args.device)  # several processes under `accelerate launch`, else one
    if procs.main:
        print("\n".join(plan.lines()))
    rep = Reproduction(
        plan,
        base=args.base,
        data=args.data,
        out=Path(args.out),
        test=args.test,
        encoder_weights=args.encoder,
        inception_head=args.inception_head,
        device=args.device,
        stop_after=args.stop_after,
        processes=procs,
    )
    try:
        paths = rep.run()
    except Stopped as exc:
        if procs.main:
            print(str(exc), file=sys.stderr)
        return 3
    if not procs.main:
        return 0  # its share is made; the main process evaluates and writes the table
    print(f"table: {paths['csv']} and {paths['md']}; plot: {paths['plot']}")
    return 0
