"""``python -m histolab generate``: images from a prompt, a reference patch or a PNG's recipe.

Writes ``DIR/000000-seed7.png ...`` (each with its recipe) and ``DIR/recipes.jsonl``
through histolab.batch: the run streams to disk, ``--resume`` continues a
stopped one, and ``accelerate launch -m histolab generate ...`` splits it
across processes (GPUs), each image keeping seed ``--seed + index``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from histolab.config import EMBEDDED_BASE_ID
from histolab.errors import InvalidRequest
from histolab.schedulers import SCHEDULER_NAMES

NAME = "generate"
HELP = "generate images (PNG with recipe + recipes.jsonl) from a prompt, a reference patch or a PNG's recipe"


def add_arguments(p: argparse.ArgumentParser) -> None:
    # Request options default to None so that --from-png can tell "given" from "not given":
    # a given option overrides the PNG's recipe; otherwise GenerationRequest's default applies.
    p.add_argument("--prompt", help="text prompt (prompt mode)")
    p.add_argument("--negative-prompt", help="what to steer away from (the unconditional branch of guidance)")
    p.add_argument(
        "--reference",
        metavar="PATCH.png|FOLDER",
        help="reference mode: generate from this tissue patch through a projector adapter (--adapter) instead of "
        "text; a folder: --n images (default 1) per patch, seeded per patch, into OUT/<patch>/, resumable",
    )
    p.add_argument(
        "--guidance", type=float, help="classifier-free guidance scale (default 7.5; ~1.3 in reference mode)"
    )
    p.add_argument("--steps", type=int, help="denoising steps (default 50)")
    p.add_argument("--scheduler", choices=SCHEDULER_NAMES, help="sampler (default dpmpp_2m_karras)")
    p.add_argument("--width", type=int, help="image width in pixels (default: the base model's native size)")
    p.add_argument("--height", type=int, help="image height in pixels (default: the base model's native size)")
    p.add_argument("--n", type=int, help="number of images in all (default 4; 1 with --from-png)")
    p.add_argument("--batch-size", type=int, default=4, help="images per forward pass (micro-batch; memory vs speed)")
    p.add_argument("--seed", type=int, help="base seed: image i gets seed + i (default 0)")
    p.add_argument(
        "--base",
        help=f"base model: {EMBEDDED_BASE_ID!r} (the default), a diffusers folder, a .safetensors file or a hub id",
    )
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="PATH[:STRENGTH]",
        help="apply an adapter (folder, file or registry name) at a strength (default 1.0); repeatable",
    )
    p.add_argument(
        "--from-png", metavar="FILE", help="re-run the recipe stored in this PNG (other options override it)"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for the PNGs and recipes.jsonl")
    p.add_argument("--resume", action="store_true", help="continue a stopped run in --out (same settings)")
    p.add_argument(
        "--device",
        default="auto",
        help="torch device: auto (this process's GPU under accelerate, else cuda if available, else cpu), cpu, cuda:0, ...",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "float16", "bfloat16"),
        help="what the networks run in: auto is bfloat16 on CPUs with avx512_bf16/AMX and on GPUs that support it, "
        "float16 on other GPUs, else float32; with --from-png, auto is the recipe's dtype",
    )
    p.add_argument(
        "--channels-last",
        choices=("auto", "on", "off"),
        default="auto",
        help="memory format of U-Net and VAE: auto is channels_last on CUDA, contiguous on CPU (no measured gain there)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the U-Net (slow first batch, faster after)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")


def parse_adapter(text: str):
    """``PATH[:STRENGTH]`` -> AdapterSpec. The strength is the part after the last ':' when it is a number."""
    from histolab.generation import AdapterSpec

    ref, sep, tail = text.rpartition(":")
    if sep and ref:
        try:
            return AdapterSpec(ref, float(tail))
        except ValueError:
            pass  # a ':' inside the path (e.g. C:\\...), no strength
    if not text:
        raise InvalidRequest("--adapter needs a path or name, e.g. --adapter checkpoints/my-lora:0.8")
    return AdapterSpec(text, 1.0)


def build_request(args, base_recipe=None, reference=None):
    """The GenerationRequest from the options, on top of a PNG's recipe when given."""
    from dataclasses import replace

    from histolab.generation import GenerationRequest, request_from_recipe

    req = request_from_recipe(base_recipe, reference=reference) if base_recipe else GenerationRequest()
    given = {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "guidance_scale": args.guidance,
        "steps": args.steps,
        "scheduler": args.scheduler,
        "width": args.width,
        "height": args.height,
        "seed": args.seed,
    }
    changes = {k: v for k, v in given.items() if v is not None}
    if reference is not None and base_recipe is None and args.adapter:
        # Reference mode: the adapter's recommended settings (manifest) for what the user did not set.
        from histolab.adapters.recommended import reference_settings

        rec = reference_settings(parse_adapter(a).ref for a in args.adapter)
        changes = {**rec, **changes}
    if reference is not None:
        changes.update(mode="reference", reference=reference)
    if args.adapter:
        changes["adapters"] = tuple(parse_adapter(a) for a in args.adapter)
    changes["batch_size"] = args.batch_size
    return replace(req, **changes)


def recipe_dtype(option: str, recipe) -> str:
    """The dtype to load: a given ``--dtype``; for ``auto``, the recipe's (a re-run reproduces
    its pixels exactly), else auto's choice for this machine."""
    if option == "auto" and recipe is not None and recipe.dtype:
        return recipe.dtype
    return option


def _open_reference(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError as exc:
        raise InvalidRequest(f"--reference {path!r}: no such file") from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise InvalidRequest(f"--reference {path!r} is not a readable image ({exc})") from exc


class _Progress:
    """Images done, rate and time left, on stderr (one updating line on a terminal)."""

    def __init__(self, prefix: str, quiet: bool):
        self.prefix, self.quiet, self.t0, self.start_done = prefix, quiet, time.perf_counter(), None
        self.tty = sys.stderr.isatty()

    def __call__(self, done: int, total: int) -> None:
        if self.quiet:
            return
        if self.start_done is None:
            self.start_done = done
        made, dt = done - self.start_done, time.perf_counter() - self.t0
        rate = made / dt if dt > 0 and made else 0.0
        left = f", {(total - done) / rate:.0f} s left" if rate and done < total else ""
        line = f"{self.prefix}[{done}/{total}] {rate:.2f} images/s{left}"
        print(("\r" + line) if self.tty else line, end="" if self.tty and done < total else "\n", file=sys.stderr)
        sys.stderr.flush()


def run(args) -> int:
    from histolab.batch import check_count, generate_distributed
    from histolab.pipeline import load_base, optimize_for_inference, resolve_device, resolve_dtype
    from histolab.precision import dtype_name
    from histolab.recipe import read_recipe

    _quiet_library_progress_bars()
    state = _accelerate_state(args.device)
    recipe = None
    if args.from_png:
        try:
            recipe = read_recipe(args.from_png)
        except FileNotFoundError as exc:
            raise InvalidRequest(f"--from-png {args.from_png!r}: no such file") from exc
        if recipe.mode == "reference" and not args.reference:
            raise InvalidRequest(
                f"{args.from_png} was made from a reference patch (hash {recipe.reference_hash[:10]}); "
                "pass that patch with --reference"
            )
    folder_mode = bool(args.reference) and Path(args.reference).is_dir()  # one generation per patch
    if folder_mode and recipe is not None:
        raise InvalidRequest("--reference FOLDER cannot be combined with --from-png; give one patch")
    if folder_mode:  # the first patch stands for all in the checks before the model loads
        reference = _open_reference(str(_patches(args.reference)[0]))
    else:
        reference = _open_reference(args.reference) if args.reference else None
    request = build_request(args, recipe, reference)
    if request.mode == "prompt" and not request.prompt and recipe is None:
        raise InvalidRequest("--prompt is empty: give a prompt, a --reference patch or --from-png")
    n = check_count(args.n if args.n is not None else (1 if recipe else 4))
    request.validate()  # fail before loading a model

    device = resolve_device(args.device, state.device if state else None)
    base = args.base or (recipe.base_model if recipe and recipe.base_model else EMBEDDED_BASE_ID)
    model = load_base(base, device=device, dtype=resolve_dtype(recipe_dtype(args.dtype, recipe), device))
    if recipe is not None and recipe.base_hash and model.hash != recipe.base_hash:
        print(
            f"warning: {base} is not the model that made {args.from_png} (hash {model.short_hash}, "
            f"recipe {recipe.base_hash[:10]}): the pixels will differ",
            file=sys.stderr,
        )
    if recipe is not None and recipe.dtype and dtype_name(model.dtype) != recipe.dtype:
        print(
            f"warning: {args.from_png} was made in {recipe.dtype}, this run uses {dtype_name(model.dtype)}: "
            "the pixels will differ by rounding",
            file=sys.stderr,
        )
    optimize_for_inference(
        model, channels_last={"auto": None, "on": True, "off": False}[args.channels_last], compile=args.compile
    )
    if recipe is not None and recipe.kernels and model.compiled_unets is None:
        print(
            f"warning: {args.from_png} was made with the compiled U-Net ({recipe.kernels}), which this run does not "
            "use (it needs the bfloat16 CPU path): the pixels will differ by rounding",
            file=sys.stderr,
        )

    rank = f"process {state.process_index}/{state.num_processes} " if state and state.num_processes > 1 else ""
    if folder_mode:
        from histolab.cli.reference_folder import run_folder

        return run_folder(
            args,
            model,
            request,
            state,
            lambda i, k: _Progress(f"{rank}patch {i + 1}/{k} ", args.quiet),
            _open_reference,
        )
    result = generate_distributed(
        model, request, n, args.out, state=state, resume=args.resume, progress=_Progress(rank, args.quiet)
    )
    if state is None or state.is_main_process:
        made = len(result.written)
        print(
            f"{args.out}: {n} images asked for; this process made {made}"
            + (f", {result.skipped} were already there" if result.skipped else "")
            + "; recipes in recipes.jsonl"
        )
    return 0


def _patches(folder: str):
    from histolab.cli.reference_folder import patches_in

    return patches_in(Path(folder))


def _accelerate_state(device: str):
    """accelerate's PartialState when launched as several processes (``accelerate launch``,
    torchrun), else None. On machines without CUDA the processes talk over gloo (cpu=True)."""
    import os

    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    from accelerate import PartialState

    state = PartialState(cpu=device == "cpu" or not torch.cuda.is_available())
    if state.num_processes != world:
        raise InvalidRequest(
            f"launched as {world} processes but accelerate set up {state.num_processes}; "
            "launch with `accelerate launch --multi_gpu --num_processes N` (or torchrun)"
        )
    return state


def _quiet_library_progress_bars() -> None:
    """transformers and diffusers draw a bar per weights file on stderr; this command's own
    progress line (and a one-line error) is all that should be there."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()
