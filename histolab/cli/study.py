"""``python -m histolab study ...``: create, watch, analyse and export blinded expert studies."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

NAME = "study"
HELP = "blinded expert scoring studies: create, status, add-rater, export, report, unblind"


def _owner_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--unblinded", action="store_true", help="the owner's unblinded view (needs --owner)")
    p.add_argument("--owner", help="the study owner's name, as in the study config (required with --unblinded)")
    p.add_argument("--metrics", type=Path, help="per-item/per-set metrics (CSV or JSON) to correlate with the scores")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--annotations",
        type=Path,
        help="the annotations folder holding review.db (default: HISTOLAB_ANNOTATIONS, or HISTOLAB_DATA_DIR/annotations)",
    )
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    p = sub.add_parser("create", help="create a study from a YAML config (see examples/study.yaml)")
    p.add_argument("--config", type=Path, required=True, help="the study config (YAML)")
    p.add_argument("--codes", type=Path, help="write the raters' sign-in codes to this CSV instead of printing them")

    sub.add_parser("list", help="list the studies in the store")

    p = sub.add_parser("status", help="progress of every rater (nothing unblinded)")
    p.add_argument("study", help="study id")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = sub.add_parser("add-rater", help="add a rater to a study; prints their sign-in code once")
    p.add_argument("study", help="study id")
    p.add_argument("rater", help="rater id (lowercase letters, digits, '_', '-', '.')")
    p.add_argument("--name", help="the rater's display name (default: the id)")

    p = sub.add_parser("reset-code", help="issue a new sign-in code for a rater (the old one stops working)")
    p.add_argument("study", help="study id")
    p.add_argument("rater", help="rater id")

    p = sub.add_parser("export", help="write the ratings and analysis as CSV and/or JSON (blinded unless --unblinded)")
    p.add_argument("study", help="study id")
    p.add_argument("--out", type=Path, help="output folder (default: <annotations>/exports/<study>)")
    p.add_argument("--format", choices=["csv", "json", "all"], default="all", help="csv tables, one JSON file, or both")
    _owner_args(p)

    p = sub.add_parser("report", help="write a self-contained HTML report with plots (blinded unless --unblinded)")
    p.add_argument("study", help="study id")
    p.add_argument(
        "--out", type=Path, help="the HTML file (default: <annotations>/exports/<study>/<study>_report.html)"
    )
    _owner_args(p)

    p = sub.add_parser(
        "prompt-ranks",
        help="the per-prompt ranking with the real image: mean rank per source, real ranked first, metrics by rank",
    )
    p.add_argument("study", help="study id")
    p.add_argument("--owner", help="the study owner's name: show source names (default: the anonymous labels)")
    p.add_argument("--metrics", type=Path, help="per-item/per-set metrics (CSV or JSON) to average by rank tier")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")

    p = sub.add_parser("unblind", help="owner only: the source and images behind every rater's opaque task ids")
    p.add_argument("study", help="study id")
    p.add_argument("--owner", required=True, help="the study owner's name")
    p.add_argument("--out", type=Path, help="write CSV here instead of to stdout")

    p = sub.add_parser(
        "demo-data", help="write real and generated image folders to try a study on (see examples/study.yaml)"
    )
    p.add_argument(
        "--out", type=Path, required=True, help="folder to write real/, reference/ and one folder per model into"
    )
    p.add_argument("--per-class", type=int, default=10, help="images per class in each rated set (default 10)")
    p.add_argument("--steps", type=int, default=4, help="denoising steps for the generated sets (default 4)")

    for action, text in (("close", "stop taking answers (owner only)"), ("reopen", "take answers again (owner only)")):
        p = sub.add_parser(action, help=text)
        p.add_argument("study", help="study id")
        p.add_argument("--owner", required=True, help="the study owner's name")


def _write_rows(rows: list[dict], out: Path | None) -> None:
    fh = open(out, "w", newline="", encoding="utf-8") if out else sys.stdout  # noqa: SIM115
    try:
        cols = list(rows[0]) if rows else ["empty"]
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    finally:
        if out:
            fh.close()


def run(args: argparse.Namespace) -> int:
    from histolab.errors import StudyError
    from histolab.review import Store, add_rater, create_study, list_studies, load_config, study_status, unblind
    from histolab.review.study import reset_rater_code, set_status

    if args.action == "demo-data":
        from histolab.cli.demo_data import write_demo_sources

        out = write_demo_sources(args.out, per_class=args.per_class, steps=args.steps)
        print(f"wrote demo sources to {out}: " + ", ".join(sorted(p.name for p in out.iterdir() if p.is_dir())))
        return 0
    store = Store(args.annotations)
    if args.action == "create":
        config = load_config(args.config)
        rep = create_study(store, config)
        print("\n".join(rep.lines()))
        if rep.raters:
            if args.codes:
                _write_rows([{"rater": r, "code": c} for r, c in rep.raters.items()], args.codes)
                print(f"sign-in codes written to {args.codes}")
            else:
                print("sign-in codes (shown once; `study reset-code` issues new ones):")
                for r, c in rep.raters.items():
                    print(f"  {r}: {c}")
        return 0
    if args.action == "list":
        for s in list_studies(store):
            print(f"{s['study_id']}\t{s['status']}\t{s['mode']}\towner={s['owner']}\t{s['title']}")
        return 0
    if args.action == "status":
        st = study_status(store, args.study)
        if args.json:
            print(json.dumps(st, indent=1))
            return 0
        print(
            f"{st['study_id']} ({st['status']}, {st['mode']} mode): {st['tasks_per_rater']} tasks per rater, "
            f"{st['submissions']} submissions, {st['ratings']} current ratings"
        )
        for r in st["raters"]:
            ranks = f" rank groups: {r['rank_done']}/{r['rank_total']}" if r["rank_total"] else ""
            print(f"  {r['rater_id']:<20} {r['done']:>5}/{r['total']:<5}{ranks} last: {r['last_activity'] or '-'}")
        return 0
    if args.action == "add-rater":
        code = add_rater(store, args.study, args.rater, args.name)
        print(f"added {args.rater} to {args.study}; sign-in code (shown once): {code}")
        return 0
    if args.action == "reset-code":
        print(f"new sign-in code for {args.rater}: {reset_rater_code(store, args.study, args.rater)}")
        return 0
    if args.action in ("export", "report"):
        if args.unblinded and not args.owner:
            raise StudyError("--unblinded needs --owner (only the study owner may unblind)")
        metrics = None
        if args.metrics:
            from histolab.review.metrics_file import load_metrics

            metrics = load_metrics(args.metrics)
        default_dir = store.root / "exports" / args.study
        if args.action == "export":
            from histolab.review.export import export_study

            paths = export_study(
                store,
                args.study,
                args.out or default_dir,
                fmt=args.format,
                blinded=not args.unblinded,
                owner=args.owner,
                metrics=metrics,
            )
            for p in paths:
                print(p)
        else:
            from histolab.review.report import write_report

            tag = "unblinded" if args.unblinded else "blinded"
            out = args.out or default_dir / f"{args.study}_{tag}_report.html"
            print(write_report(store, args.study, out, blinded=not args.unblinded, owner=args.owner, metrics=metrics))
        return 0
    if args.action == "prompt-ranks":
        from histolab.review.prompt_rank_analysis import prompt_rank_summary
        from histolab.review.study import load_study, require_owner

        info = load_study(store, args.study)
        labels = None
        if args.owner:
            require_owner(info, args.owner)
        else:
            labels = {
                k: ("real image" if s["kind"] == "real" else s["label"]) for s in info.sources for k in [s["name"]]
            }
        metrics = None
        if args.metrics:
            from histolab.review.metrics_file import load_metrics

            metrics = load_metrics(args.metrics)
        summary = prompt_rank_summary(store, args.study, metrics, labels=labels)
        print(json.dumps(summary.to_dict(), indent=1) if args.json else "\n".join(summary.lines()))
        return 0
    if args.action == "unblind":
        _write_rows(unblind(store, args.study, args.owner), args.out)
        return 0
    if args.action in ("close", "reopen"):
        set_status(store, args.study, args.owner, "closed" if args.action == "close" else "open")
        print(f"study {args.study} is {'closed' if args.action == 'close' else 'open'}")
        return 0
    raise StudyError(f"unknown action {args.action!r}")
