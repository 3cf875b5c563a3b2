"""What the start-up worker needs to make the first images without diffusers or transformers' models.

At start-up the app's own process spends most of its first seconds importing (gradio about 3.5 s,
torch, diffusers and transformers about 4 s more of the same core on the 2-core machine of issue 14),
so its first images came 12.6 s after the start. A second process that imports only torch can make
them sooner (histolab.startup_worker), if everything it runs was prepared beforehand, on this machine:

* the U-Net: the packages compiled ahead of time (histolab.compiled_unet), found by the same key;
* the text encoder and the VAE decoder: TorchScript traces of the model's own modules in its dtype
  (the same ATen kernels as the eager modules, hence the same bits; checked in tests);
* the tokenizer: the model folder's own files (transformers' CLIPTokenizer, 1 s to import, no model
  code);
* the sampler: histolab.dpm_solver (diffusers' schedulers cost 3 s to import);
* ``manifest.json``: the rest of what ``generate`` asks of a model (sizes, scheduler config, hashes).

The bundle is written beside the packages (``python -m histolab compile-unet`` writes both) and is
tied to the base's weight files by their sha256 (the recipe's base hash), to the torch version and to
the CPU's vector extensions: the worker checks all three and declines a bundle that does not match,
and the app then waits for its own model as before. Loading a TorchScript file runs its code, so the worker
loads them only from this cache, which only ``compile-unet`` writes (as for the packages).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

from histolab.compiled_unet import cache_dir, vector_isa

FORMAT = 1
MANIFEST = "manifest.json"
TEXT_ENCODER = "text_encoder.pt"


def bundle_dir(source: str, dtype: str, root: Path | None = None) -> Path:
    """Where the bundle of base ``source`` (as the app names it) in ``dtype`` lives."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(source).name or source)[:40]
    digest = hashlib.sha256(source.encode()).hexdigest()[:12]
    return (Path(root) if root is not None else cache_dir()) / f"startup-{slug}-{digest}-{dtype}"


def model_folder(model) -> Path | None:
    """The diffusers folder ``model`` was loaded from (its hash is that folder's), or None (a single file)."""
    from histolab.config import EMBEDDED_BASE_DIR, EMBEDDED_BASE_ID

    folder = EMBEDDED_BASE_DIR if model.source == EMBEDDED_BASE_ID else Path(model.source)
    return folder if (folder / "model_index.json").is_file() and (folder / "tokenizer").is_dir() else None


def decoder_file(lat_h: int, lat_w: int) -> str:
    return f"decoder-{lat_h}x{lat_w}.pt"


def _trace(module_fn, example):
    import torch

    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings on shape branches: the trace is kept per shape
        return torch.jit.trace(module_fn, example, check_trace=False)


def _traceable(inner, call):
    """``inner`` as a module whose forward is ``call(inner, x)``: what is traced (one input, one tensor out)."""
    import torch

    class Call(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return call(self.inner, x)

    return Call().eval()


def write(model, source: str, sizes: list[int], root: Path | None = None) -> Path | None:
    """Write ``model``'s bundle for images of ``sizes`` px (square), named by ``source``; None when
    the model was not loaded from a diffusers folder (the worker needs its tokenizer files)."""
    import torch

    from histolab.compiled_unet import CompiledUNets
    from histolab.precision import dtype_name

    folder = model_folder(model)
    if folder is None:
        return None
    root = Path(root) if root is not None else cache_dir()
    out = bundle_dir(source, dtype_name(model.dtype), root)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tokens = int(model.tokenizer.model_max_length)
        ids = torch.zeros(1, tokens, dtype=torch.long)
        _trace(_traceable(model.text_encoder, lambda te, ids: te(ids)[0]), (ids,)).save(str(tmp / TEXT_ENCODER))
        decoders = {}
        for size in dict.fromkeys(sizes):
            lat = size // model.vae_scale_factor
            z = torch.zeros(1, int(model.vae.config.latent_channels), lat, lat, dtype=model.dtype)
            name = decoder_file(lat, lat)
            _trace(_traceable(model.vae, lambda vae, z: vae.decode(z).sample), (z,)).save(str(tmp / name))
            decoders[f"{lat}x{lat}"] = name
        unet_config = json.loads(json.dumps(dict(model.unet.config), default=str))
        manifest = {
            "format": FORMAT,
            "source": source,
            "name": model.name,
            "folder": str(folder.resolve()),
            "base_hash": model.hash,
            "dtype": dtype_name(model.dtype),
            "torch": torch.__version__,
            "isa": vector_isa(),
            "unet_digest": CompiledUNets(root).digest(model.unet),
            "unet_config": unet_config,
            "packages": str(root),
            "vae_scale_factor": model.vae_scale_factor,
            "size_multiple": model.size_multiple,
            "default_size": model.default_size,
            "vae_scaling_factor": float(model.vae.config.scaling_factor),
            "tokens": tokens,
            "cross_attention_dim": model.cross_attention_dim,
            "scheduler_config": model.scheduler_config,
            "text_encoder": TEXT_ENCODER,
            "decoders": decoders,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def is_current(model, source: str, sizes: list[int], root: Path | None = None) -> bool:
    """Whether the bundle for ``model`` as ``source`` exists and matches it (weights, torch, CPU, sizes)."""
    import torch

    from histolab.precision import dtype_name

    try:
        m = json.loads((bundle_dir(source, dtype_name(model.dtype), root) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    lats = {f"{s // model.vae_scale_factor}x{s // model.vae_scale_factor}" for s in sizes}
    return (
        m.get("format") == FORMAT
        and m.get("base_hash") == model.hash
        and m.get("torch") == torch.__version__
        and m.get("isa") == vector_isa()
        and lats <= set(m.get("decoders", {}))
    )


def read(folder: Path) -> dict[str, Any]:
    """The manifest of the bundle in ``folder``, checked against this machine and the base's files.
    Raises ValueError naming what does not match."""
    import torch

    from histolab.pipeline import folder_hash

    try:
        m = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"no readable bundle in {folder}: {exc}") from None
    if m.get("format") != FORMAT:
        raise ValueError(f"bundle format {m.get('format')!r}, this histolab reads {FORMAT}")
    if m.get("torch") != torch.__version__:
        raise ValueError(f"bundle made with torch {m.get('torch')}, this is {torch.__version__}")
    if m.get("isa") != vector_isa():
        raise ValueError("bundle made on a CPU with other vector extensions")
    base = Path(m["folder"])
    if not (base / "model_index.json").is_file():
        raise ValueError(f"the base folder {base} is gone")
    if folder_hash(base) != m["base_hash"]:
        raise ValueError(f"the weights in {base} changed since the bundle was written")
    return m
