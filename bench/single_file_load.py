"""Loading a single-file SD checkpoint: histolab's loader vs diffusers' from_single_file.

Builds an SD-1.5-shaped model with random weights (they load exactly like
trained ones), exports it with ``save_single_file`` as SD-webui files usually
are (fp16 safetensors), then times, in the same run:

* ours:      ``histolab.single_file.load_single_file`` (offline, configs from our architectures)
* reference: ``StableDiffusionPipeline.from_single_file`` given a local config folder

and checks that both give the same weights, bit for bit. Prints the best of
``--repeat`` timings each and the ratio (reference / ours: > 1 means ours is faster).

    nice -n 5 python bench/single_file_load.py --arch sd15 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import histolab  # noqa: F401  (torchvision shim first)


def config_folder(model, out: Path) -> Path:
    """A diffusers pipeline folder with configs and tokenizer but no weights."""
    import diffusers
    from diffusers import PNDMScheduler

    model.unet.save_config(out / "unet")
    model.vae.save_config(out / "vae")
    model.text_encoder.config.save_pretrained(out / "text_encoder")
    model.tokenizer.save_pretrained(out / "tokenizer")
    PNDMScheduler.from_config(model.scheduler_config).save_config(out / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "vae": ["diffusers", "AutoencoderKL"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out


def best_of(fn, repeat: int):
    times, result = [], None
    for _ in range(repeat):
        result = None
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sd15", help="architecture: sd15, embedded or tiny")
    ap.add_argument("--repeat", type=int, default=3, help="timed loads of each loader; the best is reported")
    ap.add_argument("--workdir", default=None, help="folder for the exported file (default: a temporary one)")
    args = ap.parse_args()

    import torch
    from diffusers import StableDiffusionPipeline

    from histolab.embedded.random_init import random_base
    from histolab.files import _HASH_CACHE
    from histolab.single_file import load_single_file, save_single_file

    work = Path(args.workdir or tempfile.mkdtemp(prefix="histolab-bench-sf-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = random_base(args.arch, seed=0)
    print(f"built random {args.arch} in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    path = save_single_file(model, work / f"{args.arch}.safetensors", dtype=torch.float16)
    print(f"save_single_file (fp16): {time.perf_counter() - t0:.2f} s, {path.stat().st_size / 2**20:.0f} MiB")
    cfg = config_folder(model, work / "config")
    del model

    def ours_load():
        _HASH_CACHE.clear()  # every timed load hashes the file, as a first load does
        return load_single_file(path, dtype=torch.float32)

    ours_t, ours = best_of(ours_load, args.repeat)
    ref_t, ref = best_of(
        lambda: StableDiffusionPipeline.from_single_file(
            str(path), config=str(cfg), local_files_only=True, torch_dtype=torch.float32, safety_checker=None
        ),
        args.repeat,
    )
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(ours, name).state_dict(), getattr(ref, name).state_dict()
        same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        print(f"{name}: {len(a)} tensors, identical to diffusers' load: {same}")
        if not same:
            raise SystemExit(f"{name} differs from diffusers' from_single_file")
    print(f"ours (load_single_file, with sha256): {ours_t:.2f} s")
    print(f"reference (diffusers from_single_file): {ref_t:.2f} s (computes no content hash)")
    print(f"ratio reference/ours: {ref_t / ours_t:.2f}x (best of {args.repeat}, {args.arch}, fp16 file -> fp32)")


if __name__ == "__main__":
    main()
