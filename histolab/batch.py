"""Large generation runs, streamed to disk, resumable, split across processes.

FID needs thousands of images per model; a run of that size must not hold its
images in memory, must survive being stopped, and should use every GPU. An
output folder holds::

    run.json                 the run's settings; a resume must match them
    000000-seed7.png         image ``index`` made with seed ``seed + index``,
    000001-seed8.png ...     its recipe inside (histolab.recipe)
    recipes.jsonl            one line per image, in index order:
                             {"index": 0, "file": "000000-seed7.png", "recipe": {...}}

Crash safety. A PNG is written to ``.NAME.part`` and renamed into place only
once complete (and flushed to disk), so a file under a final name is always a
whole image; ``.part`` files left by a crash are deleted on resume. A line is
appended to the index only after its PNG is in place, so a crash can leave a
PNG without its line (or a torn last line), never a line without its PNG.
Resuming rebuilds ``recipes.jsonl`` from the PNGs themselves (each carries its
recipe): torn lines are dropped, missing lines read back from the files, and
a PNG that fails to verify is deleted and made again.

Several processes (``accelerate launch -m histolab generate ...``). Process
``i`` of ``k`` makes the indices with ``index % k == i``; every image keeps
seed ``seed + index``, so the folder is the same whatever ``k`` is (and a run
may be resumed with another ``k``). While running, process ``i`` appends its
lines to its own shard ``recipes.p{i}.jsonl``; when all are done the main
process merges the shards into ``recipes.jsonl`` (sorted by index, checked
against the PNGs) and deletes them. A single process writes ``recipes.jsonl``
directly.

Image ``index`` is the same whatever the micro-batch size (histolab.generation
draws each image's noise from its own generator), so a resumed or split run
gives the pixels of an uninterrupted single-process run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from histolab.errors import Cancelled, InvalidRequest, is_cancelled
from histolab.generation import GenerationRequest, generate
from histolab.recipe import JSON_KEY, Recipe, pnginfo

MANIFEST = "run.json"
INDEX = "recipes.jsonl"
MANIFEST_VERSION = 1
MAX_IMAGES = 10_000_000  # names carry at least 6 digits; beyond this a run is surely a typo

_PNG = re.compile(r"^(\d{6,})-seed(\d+)\.png$")
_SHARD = re.compile(r"^recipes\.p(\d+)\.jsonl$")

ImagesProgress = Callable[[int, int], None]  # (images done by this process, images it owns)


@dataclass
class BatchResult:
    out_dir: Path
    total: int  # images the run asks for
    done: int  # images of this process's share now on disk
    written: list[int] = field(default_factory=list)  # indices this call generated
    skipped: int = 0  # of this process's share, already on disk when it started


def image_name(index: int, seed: int) -> str:
    return f"{index:06d}-seed{seed}.png"


def owned_indices(n: int, process_index: int = 0, num_processes: int = 1) -> range:
    """The image indices process ``process_index`` of ``num_processes`` makes."""
    if not (isinstance(num_processes, int) and num_processes >= 1 and 0 <= process_index < num_processes):
        raise InvalidRequest(
            f"process {process_index!r} of {num_processes!r}: need 0 <= process_index < num_processes, num_processes >= 1"
        )
    return range(process_index, n, num_processes)


def shard_name(process_index: int, num_processes: int) -> str:
    return INDEX if num_processes == 1 else f"recipes.p{process_index}.jsonl"


# ---------------------------------------------------------------- the run's settings


def reference_digest(reference) -> str:
    """sha256 of a reference patch's RGB pixels and size (what the manifest compares)."""
    if reference is None:
        return ""
    img = reference.convert("RGB")
    h = hashlib.sha256(f"{img.width}x{img.height}".encode())
    h.update(img.tobytes())
    return h.hexdigest()


def manifest_for(model, request: GenerationRequest, n: int) -> dict[str, Any]:
    """What identifies a run. The micro-batch size and the device are left out: they
    do not change the images (seeds are per image), so a resume may change them."""
    req = request.validate(model)
    return {
        "version": MANIFEST_VERSION,
        "n": n,
        "base_model": model.name,
        "base_hash": model.hash,
        "dtype": str(model.dtype).removeprefix("torch."),
        "request": {
            "prompt": req.prompt,
            "negative_prompt": req.negative_prompt,
            "mode": req.mode,
            "reference_sha256": reference_digest(req.reference),
            "guidance_scale": float(req.guidance_scale),
            "steps": req.steps,
            "scheduler": req.scheduler,
            "width": req.width,
            "height": req.height,
            "seed": req.seed,
            "adapters": [{"ref": a.ref, "strength": float(a.strength)} for a in req.adapters],
        },
    }


def prepare_dir(out_dir: str | Path, manifest: dict[str, Any], *, resume: bool) -> Path:
    """Create or check the output folder (main process only, before any worker starts).

    A new folder gets ``run.json``. A folder that already holds a run is refused
    unless ``resume``, and then only if its settings are this run's; the image
    count may grow (to make more images for the same run), never shrink.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InvalidRequest(f"output {str(out)!r} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    path = out / MANIFEST
    if not path.exists():
        stray = [p.name for p in out.iterdir() if _PNG.match(p.name)]
        if stray and not resume:
            raise InvalidRequest(
                f"{out} already holds {len(stray)} generated image(s) but no {MANIFEST}; "
                "choose an empty folder for --out"
            )
        _atomic_write(path, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        return out
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"{path} is damaged ({exc}); move the folder aside and start again") from exc
    if not resume:
        raise InvalidRequest(
            f"{out} already holds a run ({old.get('n', '?')} images asked for); pass --resume to continue it "
            "or choose another --out"
        )
    diffs = _differences(old, manifest)
    if diffs:
        raise InvalidRequest(
            f"cannot resume {out}: this run differs from the one there in {'; '.join(diffs)}. "
            "Use the same settings (see its run.json) or another --out"
        )
    if manifest["n"] < old.get("n", 0):
        raise InvalidRequest(
            f"cannot resume {out} with --n {manifest['n']}: the run there asks for {old['n']} images; "
            f"pass --n {old['n']} or more"
        )
    if manifest["n"] != old.get("n"):
        _atomic_write(path, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return out


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'key: <old> there, <new> now' for every setting that differs (the image count aside)."""
    pairs = [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if k not in ("n", "request")]
    old_req, new_req = old.get("request", {}), new.get("request", {})
    pairs += [(f"request.{k}", old_req.get(k), new_req.get(k)) for k in sorted(set(old_req) | set(new_req))]
    return [f"{k}: {a!r} there, {b!r} now" for k, a, b in pairs if a != b]


def read_manifest(out_dir: str | Path) -> dict[str, Any]:
    path = Path(out_dir) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise InvalidRequest(f"{path} is missing: the main process prepares the folder before the workers") from exc


# ---------------------------------------------------------------- index: recipes.jsonl


def _read_lines(path: Path) -> Iterable[dict[str, Any]]:
    """The JSON lines of an index or shard; a torn or damaged line (a crash mid-append) is skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("index"), int) and isinstance(row.get("recipe"), dict):
            rows.append(row)
    return rows


def _verified_recipe(path: Path, expected_seed: int) -> dict[str, Any] | None:
    """The recipe of a complete PNG of ours, or None if the file is damaged or not the image expected."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()  # every chunk's CRC, through to IEND: a truncated file fails here
        with Image.open(path) as im:
            recipe = json.loads(im.info[JSON_KEY])
    except Exception:  # any damage (truncation, bad CRC, missing or bad chunk) means "not done"
        return None
    return recipe if recipe.get("seed") == expected_seed else None


def merge_index(out_dir: str | Path, *, verify_all: bool = False) -> list[int]:
    """Rebuild ``recipes.jsonl`` from the index, the shards and the PNGs; return the done indices.

    Run by the main process only, when no worker is writing (before they start
    and after they finish). A line counts only if its PNG is there; a PNG with
    no line is verified and its recipe read from it; with ``verify_all`` (on
    resume) every PNG is verified. Damaged PNGs and stale ``.part`` files are
    deleted so that the workers make those images again.
    """
    out = Path(out_dir)
    manifest = read_manifest(out)
    n, base_seed = manifest["n"], manifest["request"]["seed"]
    rows: dict[int, dict[str, Any]] = {}
    shards = [p for p in out.iterdir() if _SHARD.match(p.name)]
    for path in [out / INDEX, *sorted(shards)]:
        for row in _read_lines(path):
            rows.setdefault(row["index"], row)
    done: dict[int, dict[str, Any]] = {}
    for p in out.iterdir():
        if p.name.startswith(".") and p.name.endswith(".png.part"):
            p.unlink(missing_ok=True)
            continue
        m = _PNG.match(p.name)
        if not m:
            continue
        index, seed = int(m.group(1)), int(m.group(2))
        if index >= n or seed != base_seed + index:
            continue  # not an image of this run: left alone, never listed
        row = rows.get(index)
        listed = row is not None and row.get("file") == p.name and row["recipe"].get("seed") == seed
        if listed and not verify_all:
            done[index] = row
            continue
        recipe = _verified_recipe(p, seed)
        if recipe is None:
            p.unlink()  # a damaged image is made again, never counted
            continue
        done[index] = {"index": index, "file": p.name, "recipe": recipe}
    lines = "".join(json.dumps(done[i], sort_keys=True) + "\n" for i in sorted(done))
    _atomic_write(out / INDEX, lines)
    for p in shards:
        p.unlink(missing_ok=True)
    return sorted(done)


# ---------------------------------------------------------------- the worker


def run_worker(
    model,
    request: GenerationRequest,
    out_dir: str | Path,
    *,
    process_index: int = 0,
    num_processes: int = 1,
    progress: ImagesProgress | None = None,
    cancel: threading.Event | Callable[[], bool] | None = None,
) -> BatchResult:
    """Make this process's share of a prepared run, one micro-batch at a time.

    ``request.batch_size`` is the micro-batch; ``request.seed`` the run's base
    seed. Images already in ``recipes.jsonl`` (as left by ``merge_index``) are
    skipped. Each micro-batch is written before the next is started, so memory
    holds at most one micro-batch of images.
    """
    out = Path(out_dir)
    manifest = read_manifest(out)
    diffs = _differences(manifest, manifest_for(model, request, manifest["n"]))
    if diffs:
        raise InvalidRequest(f"the run in {out} has other settings than this process's request: {'; '.join(diffs)}")
    n = manifest["n"]
    req = request.validate(model)
    owned = owned_indices(n, process_index, num_processes)
    listed = {row["index"] for row in _read_lines(out / INDEX) if (out / row.get("file", "")).is_file()}
    todo = [i for i in owned if i not in listed]
    result = BatchResult(out, total=n, done=len(owned) - len(todo), skipped=len(owned) - len(todo))
    shard = out / shard_name(process_index, num_processes)
    if progress is not None:
        progress(result.done, len(owned))
    for start in range(0, len(todo), req.batch_size):
        if is_cancelled(cancel):
            raise Cancelled(f"generation cancelled after {result.done} of {len(owned)} images")
        chunk = todo[start : start + req.batch_size]
        try:
            images = generate(model, req, cancel=cancel, seeds=[req.seed + i for i in chunk])
        except Cancelled:
            raise Cancelled(f"generation cancelled after {result.done} of {len(owned)} images") from None
        with open(shard, "a", encoding="utf-8") as index_file:
            for i, img in zip(chunk, images, strict=True):
                name = image_name(i, img.recipe.seed)
                _write_png(img.image, img.recipe, out / name)
                row = {"index": i, "file": name, "recipe": img.recipe.to_dict()}
                index_file.write(json.dumps(row, sort_keys=True) + "\n")
                index_file.flush()
                result.written.append(i)
                result.done += 1
        del images
        if progress is not None:
            progress(result.done, len(owned))
    return result


def generate_to_dir(
    model,
    request: GenerationRequest,
    n: int,
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: ImagesProgress | None = None,
    cancel: threading.Event | Callable[[], bool] | None = None,
) -> BatchResult:
    """A whole run in this process: prepare the folder, make every image, write the index.

    On cancellation the index is still brought up to date before ``Cancelled``
    is raised, so the folder is consistent and ``resume=True`` continues it.
    """
    check_count(n)
    out = Path(out_dir)
    fresh = not (out / MANIFEST).exists()
    prepare_dir(out, manifest_for(model, request, n), resume=resume)
    merge_index(out, verify_all=resume)
    try:
        return run_worker(model, request, out, progress=progress, cancel=cancel)
    except BaseException:
        if fresh and not merge_index(out):
            _remove_empty_run(out)  # a run that failed before its first image leaves nothing to resume
        raise
    finally:
        if (out / MANIFEST).exists():
            merge_index(out)


def generate_distributed(
    model,
    request: GenerationRequest,
    n: int,
    out_dir: str | Path,
    *,
    state=None,
    resume: bool = False,
    progress: ImagesProgress | None = None,
    cancel: threading.Event | Callable[[], bool] | None = None,
) -> BatchResult:
    """A run split across the processes of ``accelerate launch`` (``state``: an
    ``accelerate.PartialState``; one process works alone like ``generate_to_dir``).

    The main process prepares the folder, everyone waits, each makes its share,
    everyone waits, the main process merges the shards into ``recipes.jsonl``.
    """
    check_count(n)
    if state is None or state.num_processes == 1:
        return generate_to_dir(model, request, n, out_dir, resume=resume, progress=progress, cancel=cancel)
    manifest = manifest_for(model, request, n)
    error: Exception | None = None
    if state.is_main_process:
        try:
            prepare_dir(out_dir, manifest, resume=resume)
            merge_index(out_dir, verify_all=resume)
        except Exception as exc:  # re-raised after the barrier, so the other processes are not left waiting
            error = exc
    state.wait_for_everyone()
    if error is not None:
        raise error
    if not (Path(out_dir) / MANIFEST).exists():
        raise InvalidRequest(f"the main process could not prepare {out_dir}; see its error")
    result = run_worker(
        model,
        request,
        out_dir,
        process_index=state.process_index,
        num_processes=state.num_processes,
        progress=progress,
        cancel=cancel,
    )
    state.wait_for_everyone()
    if state.is_main_process:
        merge_index(out_dir)
    return result


def check_count(n) -> int:
    if not isinstance(n, int) or not 1 <= n <= MAX_IMAGES:
        raise InvalidRequest(f"the number of images must be from 1 to {MAX_IMAGES} but is {n!r}")
    return n


# ---------------------------------------------------------------- files


def _write_png(image, recipe: Recipe, path: Path) -> None:
    """Write to ``.NAME.part``, flush it to disk, then rename: a crash never leaves a partial PNG under NAME."""
    tmp = path.with_name(f".{path.name}.part")
    with open(tmp, "wb") as fh:
        image.save(fh, format="PNG", pnginfo=pnginfo(recipe))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _remove_empty_run(out: Path) -> None:
    for name in (MANIFEST, INDEX):
        (out / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        out.rmdir()  # only if nothing else is in it


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
