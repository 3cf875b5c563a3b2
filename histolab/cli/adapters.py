"""``python -m histolab adapters``: list the adapters in checkpoints/ and whether they fit a base model."""

from __future__ import annotations

import argparse

NAME = "adapters"
HELP = (
    "list the adapters in checkpoints/ (kind, base, whether each fits the base model and why not; for those that "
    "fit, what loading does: modules patched in the U-Net and text encoder, keys ignored)"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base",
        default="embedded",
        help="base model to check against: 'embedded' (default), a diffusers folder, a single file or a hub id",
    )
    parser.add_argument(
        "--checkpoints",
        default=None,
        help="folder to list (default: checkpoints/ of the data dir, or $HISTOLAB_CHECKPOINTS)",
    )
    parser.add_argument("--no-check", action="store_true", help="list only; do not check against a base model")
    parser.add_argument("--json", action="store_true", help="print one JSON object per line instead of a table")


def run(args: argparse.Namespace) -> int:
    import json
    import sys
    from pathlib import Path

    from histolab.adapters.registry import scan, shape_model
    from histolab.config import Paths
    from histolab.errors import HistolabError

    root = Path(args.checkpoints) if args.checkpoints else Paths.from_env().checkpoints
    base, note = None, ""
    if not args.no_check:
        try:
            base = shape_model(args.base)
        except HistolabError as exc:
            note = f"not checked against a base model: {exc}"
    entries = scan(root, base=base)
    if args.json:
        for e in entries:
            print(json.dumps(e.to_dict(), sort_keys=True))
        return 0
    print(f"{root}: {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}" + (f"; base {args.base}" if base else ""))
    if note:
        print(note, file=sys.stderr)
    if not entries:
        return 0
    rows = [("NAME", "KIND", "FORMAT", "MADE FOR", "FITS", "WHY / NOTES")]
    for e in entries:
        fits = "-" if e.fits is None else ("yes" if e.fits else "no")
        extra = [
            x
            for x in (
                e.why,
                e.report.partition(": ")[2],  # the report without the name the row already shows
                f"trigger: {e.trigger}" if e.trigger else "",
                f"encoder: {e.encoder}" if e.encoder else "",
            )
            if x
        ]
        rows.append((e.name, e.kind, e.format, e.base or "?", fits, "; ".join(extra)))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:5], widths, strict=True)) + "  " + r[5])
    return 0
