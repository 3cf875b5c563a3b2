"""``python -m histolab.launch ARGS``: ``accelerate launch ARGS`` on any torch build.

accelerate's console script imports timm (for its ``estimate-memory``
command), hence torchvision, before any of our code runs; on a CPU build of
torch that import fails (see histolab/_torchvision_compat.py). This runs the
same ``accelerate launch`` with histolab imported first. On a CUDA install the
plain ``accelerate launch`` works too.

    python -m histolab.launch --multi_gpu --num_processes 2 -m histolab generate --n 1000 --out runs/x
"""

from __future__ import annotations

import sys

import histolab  # noqa: F401  (arranges the torchvision repair before accelerate imports timm)


def main(argv: list[str] | None = None) -> int:
    from accelerate.commands.accelerate_cli import main as accelerate_main

    sys.argv = ["accelerate", "launch", *(sys.argv[1:] if argv is None else argv)]
    accelerate_main()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
