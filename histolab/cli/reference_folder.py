"""``generate --reference FOLDER``: one generation (or ``--n``) per patch of a folder, as a test-set protocol
needs (the 2026 paper: 375 test patches, one image each).

Patches are taken in sorted name order; patch ``i`` gets seed ``seed + i * n`` (distinct per image, and the
same for a patch however many runs it took); its images go to ``OUT/<patch name>/`` with their recipes. A run
stopped at any point continues where it stopped: finished patches are skipped, a half-made one is resumed.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from histolab.errors import InvalidRequest

PATCH_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


def patches_in(folder: Path) -> list[Path]:
    files = sorted(
        f
        for f in folder.rglob("*")
        if f.is_file() and f.suffix.lower() in PATCH_SUFFIXES and not f.name.startswith(".")
    )
    if not files:
        raise InvalidRequest(f"--reference {folder}: the folder has no image files ({', '.join(PATCH_SUFFIXES)})")
    return files


def patch_dir(out: Path, folder: Path, patch: Path) -> Path:
    rel = patch.relative_to(folder).with_suffix("")
    return out / "__".join(rel.parts)


def run_folder(args, model, request, state, progress_for, open_reference) -> int:
    """Generate for every patch of ``args.reference`` with ``request`` (already carrying the options)."""
    from histolab.batch import MANIFEST, check_count, generate_distributed

    folder, out = Path(args.reference), Path(args.out)
    patches = patches_in(folder)
    n = check_count(args.n if args.n is not None else 1)
    base_seed = args.seed if args.seed is not None else 0
    made = skipped = 0
    for i, patch in enumerate(patches):
        sub = patch_dir(out, folder, patch)
        req = replace(request, mode="reference", reference=open_reference(str(patch)), seed=base_seed + i * n)
        result = generate_distributed(
            model, req, n, sub, state=state, resume=(sub / MANIFEST).exists(), progress=progress_for(i, len(patches))
        )
        made, skipped = made + len(result.written), skipped + result.skipped
    if state is None or state.is_main_process:
        print(
            f"{out}: {len(patches)} patches x {n} image{'s' if n != 1 else ''}; this process made {made}"
            + (f", {skipped} were already there" if skipped else "")
            + "; one folder per patch, recipes in each recipes.jsonl",
            file=sys.stdout,
        )
    return 0
