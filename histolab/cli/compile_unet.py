"""``python -m histolab compile-unet``: the U-Net compiled ahead of time (histolab.compiled_unet)."""

from __future__ import annotations

from pathlib import Path

NAME = "compile-unet"
HELP = (
    "Compile a base model's U-Net ahead of time (AOTInductor) for the CPU fast path: about a minute per batch "
    "shape, once per machine; generation uses the packages from then on (the app starts this after its preload). Also writes the "
    "start-up bundle the app's first images come from (histolab.startup_bundle)."
)


def add_arguments(p) -> None:
    p.add_argument("--base", default="embedded", help="base model: embedded, a diffusers folder, a file or a hub id")
    p.add_argument("--dtype", default="auto", help="the dtype the app runs it in (auto: bfloat16 on avx512_bf16/AMX)")
    p.add_argument("--batches", default="4,1", help="images per generation to compile for, comma-separated (guided)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's own)")
    p.add_argument("--cache-dir", type=Path, default=None, help="where packages go (default: histolab's cache)")


def run(args) -> int:
    from histolab import startup_bundle
    from histolab.compiled_unet import app_shapes, build_missing
    from histolab.errors import InvalidRequest
    from histolab.pipeline import load_base, optimize_for_inference, resolve_dtype

    try:
        batches = tuple(int(b) for b in args.batches.split(",") if b.strip())
    except ValueError:
        raise InvalidRequest(f"--batches must be whole numbers separated by commas but is {args.batches!r}") from None
    if not batches or min(batches) < 1:
        raise InvalidRequest(f"--batches must name at least one batch size of 1 or more, not {args.batches!r}")
    model = optimize_for_inference(load_base(args.base, device="cpu", dtype=resolve_dtype(args.dtype, "cpu")))
    if model.compiled_unets is None:
        raise InvalidRequest(
            f"the U-Net is compiled for the bfloat16 CPU path only; {args.dtype!r} loads it as {model.dtype}"
        )
    built = build_missing(model, app_shapes(model, batches, args.size), args.cache_dir)
    print(f"{len(built)} package(s) built" if built else "every package was built already")
    # What the app's start-up worker needs besides the packages (histolab.startup_bundle).
    bundle = startup_bundle.write(model, args.base, [args.size or model.default_size], args.cache_dir)
    print(f"start-up bundle: {bundle}" if bundle else "no start-up bundle: the base is not a diffusers folder")
    return 0
