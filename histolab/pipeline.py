"""Load a base model (SD 1.5 architecture) and hold its components.

Sources, tried in this order by ``load_base``:

* ``"embedded"``: the default that ships in ``checkpoints/embedded-base``;
* a folder: a diffusers pipeline folder (``model_index.json``), e.g. a local
  copy of stable-diffusion-v1-5 under ``checkpoints/``;
* a file: a single-file checkpoint (LDM/A1111 layout), judged by content;
* anything else is taken as a Hugging Face hub id, loaded from the local hub
  cache or downloaded; offline, the error says which folder to put it in.

Adapters are applied to a loaded ``BaseModel`` by ``histolab.adapters``; the
model carries a lock so one request's adapters never leak into another's.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from histolab.base_model import BaseModel, assemble
from histolab.config import EMBEDDED_BASE_DIR, EMBEDDED_BASE_ID, Paths
from histolab.errors import ModelNotFound, OfflineError, UnsafeFile
from histolab.files import sha256_file, sniff


def optimize_for_inference(
    model: BaseModel,
    *,
    channels_last: bool | None = None,
    compile: bool = False,
    trace: bool | None = None,
    aot: bool | None = None,
) -> BaseModel:
    """Speed settings for generation; results stay deterministic for a given setting.

    ``channels_last`` (None: decide by device): NHWC is the native layout of
    tensor-core convolutions, so it is on for CUDA (not yet measured here: run
    ``bench/generation.py`` on a GPU, which times both). On CPU it stays off:
    measured on the embedded model with 2 cores it made single network calls
    at most a few per cent faster for the U-Net (about 17% for the decoder, a
    small share of the time) and whole generations no faster beyond the noise,
    while it changes the last bit of some pixels, so recipes made through the
    library's default (contiguous) would no longer re-run bit for bit.

    ``compile``: ``torch.compile`` the U-Net in place (``nn.Module.compile``
    keeps the module, its config and its adapter hooks); the first call then
    takes seconds to minutes, later ones run faster on GPUs.

    ``trace`` (None: on for a bfloat16 model on CPU, the fast path of
    histolab.precision): run the U-Net as frozen TorchScript graphs
    (histolab.traced), the same kernels without diffusers' Python; about a
    second to trace per batch shape, the same output bits as eager. Off for
    float32, which keeps today's eager path.

    ``aot`` (None: with the traced U-Net on CPU): use the U-Net compiled ahead
    of time (histolab.compiled_unet) for each input shape whose package has
    been built; faster kernels that round differently from ATen's (recipes
    record which ran).
    """
    import torch

    device_type = torch.device(model.device).type
    if channels_last is None:
        channels_last = device_type == "cuda"
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for m in (model.unet, model.vae):
        m.to(memory_format=fmt)
    if compile and not model.optimizations.get("compile"):
        model.unet.compile()
    compiled = bool(compile or model.optimizations.get("compile"))
    if trace is None:
        trace = device_type == "cpu" and model.dtype == torch.bfloat16 and not channels_last
    if trace and not compiled:
        from histolab.traced import TracedUNet

        model.traced_unet = model.traced_unet or TracedUNet()
    else:
        model.traced_unet = None
    if aot is None:
        aot = model.traced_unet is not None and device_type == "cpu"
    if aot and model.traced_unet is not None:
        from histolab.compiled_unet import CompiledUNets

        model.compiled_unets = model.compiled_unets or CompiledUNets()
    else:
        model.compiled_unets = None
    model.optimizations = {
        "channels_last": bool(channels_last),
        "compile": compiled,
        "trace": model.traced_unet is not None,
        "aot": model.compiled_unets is not None,
    }
    return model


def resolve_device(name: str = "auto", process_device=None) -> str:
    """``auto``: this process's device under ``accelerate launch`` (``process_device``), else
    cuda when available, else cpu; any other name is used as given."""
    import torch

    if name != "auto":
        return name
    if process_device is not None:
        return str(process_device)
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(name: str, device: str):
    """``auto``: see histolab.precision (bfloat16 on GPUs that support it and on CPUs with
    native bfloat16 instructions, float16 on other GPUs, float32 elsewhere)."""
    from histolab.precision import resolve_dtype as resolve

    return resolve(name, device)


# ----------------------------------------------------------------- loading


def load_base(
    source: str | Path = EMBEDDED_BASE_ID,
    *,
    device: str = "cpu",
    dtype: Any = None,
    paths: Paths | None = None,
) -> BaseModel:
    """Load a base model from the embedded default, a folder, a file or a hub id."""
    import torch

    dtype = dtype or torch.float32
    src = str(source)
    if src == EMBEDDED_BASE_ID:
        if not (EMBEDDED_BASE_DIR / "model_index.json").exists():
            raise ModelNotFound(
                f"the embedded default model is missing from {EMBEDDED_BASE_DIR}; "
                "restore it with `git checkout -- checkpoints/embedded-base` or retrain it with "
                "`python -m histolab.embedded.train_base`"
            )
        model = _load_folder(EMBEDDED_BASE_DIR, device, dtype)
        model.source = EMBEDDED_BASE_ID
        return model
    path = Path(src)
    if not path.exists() and not path.is_absolute():
        candidate = (paths or Paths.from_env()).checkpoints / src
        if candidate.exists():
            path = candidate
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise ModelNotFound(
                f"{path} is a folder but not a diffusers pipeline (no model_index.json); "
                "point at the folder that holds model_index.json, unet/, vae/, text_encoder/ and tokenizer/"
            )
        return _load_folder(path, device, dtype)
    if path.is_file():
        from histolab.single_file import load_single_file

        return load_single_file(path, device=device, dtype=dtype)
    if looks_like_path(src):
        where = "" if path.is_absolute() else f" here or in {(paths or Paths.from_env()).checkpoints}"
        raise ModelNotFound(
            f"no model at {src!r}: the path does not exist{where}; give a diffusers folder (with model_index.json) "
            "or a single-file .safetensors checkpoint"
        )
    return _load_hub(src, device, dtype, paths or Paths.from_env())


def looks_like_path(src: str) -> bool:
    """Hub ids are 'owner/name'; anything with a suffix, a leading dot or slash is a path."""
    return src.startswith((".", "/", "~")) or src.count("/") != 1 or Path(src).suffix != ""


def folder_hash(folder: Path) -> str:
    """sha256 over the weight files of a diffusers folder, in a fixed order."""
    h = hashlib.sha256()
    for sub in ("unet", "vae", "text_encoder"):
        for f in sorted((folder / sub).glob("*.safetensors")) + sorted((folder / sub).glob("*.bin")):
            h.update(sub.encode())
            h.update(sha256_file(f).encode())
    return h.hexdigest()


def _check_weight_files(folder: Path) -> None:
    for sub in ("unet", "vae", "text_encoder"):
        d = folder / sub
        if not d.is_dir():
            raise ModelNotFound(f"{folder} has no {sub}/ folder; it is not a complete SD pipeline")
        weights = list(d.glob("*.safetensors")) + list(d.glob("*.bin"))
        if not weights:
            raise ModelNotFound(f"{d} holds no weights (.safetensors)")
        for f in weights:
            kind = sniff(f)
            if kind not in ("safetensors", "torch-zip", "pickle"):
                raise UnsafeFile(f"{f}: not a weights file (content looks {kind})")


def _load_folder(folder: Path, device: str, dtype) -> BaseModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    _check_weight_files(folder)
    # use_safetensors: prefer them; diffusers/transformers fall back to .bin
    # through torch.load(weights_only=True) when a folder has only those.
    kw = {"torch_dtype": dtype, "local_files_only": True}
    try:
        vae = AutoencoderKL.from_pretrained(folder / "vae", **kw)
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", **kw)
        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=dtype, local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelNotFound(f"cannot load the pipeline in {folder}: {exc}") from exc
    sched_file = folder / "scheduler" / "scheduler_config.json"
    scheduler_config = json.loads(sched_file.read_text()) if sched_file.exists() else {}
    return assemble(
        str(folder), folder_hash(folder), vae, unet, text_encoder, tokenizer, scheduler_config, device, dtype
    )


# What a diffusers SD pipeline needs, and no more: SD 1.5's hub repo also holds
# fp16 and non-EMA variants, .bin copies, a safety checker and .ckpt files (tens of GB).
HUB_FILES = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "tokenizer/*",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
)


def hub_download_command(repo_id: str, target: Path) -> str:
    """The shell command that fetches ``repo_id`` into ``target`` on a machine with internet."""
    includes = " ".join(f'--include "{p}"' for p in HUB_FILES)
    return f"hf download {repo_id} {includes} --local-dir {target}"


def _load_hub(repo_id: str, device: str, dtype, paths: Paths) -> BaseModel:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = list(HUB_FILES)
    target = paths.checkpoints / repo_id.split("/")[-1]
    try:
        folder = snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True)
    except LocalEntryNotFoundError:
        try:
            folder = snapshot_download(repo_id, allow_patterns=patterns)
        except Exception as exc:  # no network: ConnectionError, OfflineModeIsEnabled, LocalEntryNotFound...
            raise OfflineError(
                f"cannot download {repo_id!r}: the Hugging Face hub is not reachable from this machine "
                f"({type(exc).__name__}). Put the model's diffusers folder at {target} "
                f"(on a machine with internet: `{hub_download_command(repo_id, target)}`, then copy the folder "
                f"over), or a single-file .safetensors checkpoint in {paths.checkpoints}; then load "
                f"{target.name!r}."
            ) from exc
    return _load_folder(Path(folder), device, dtype)


def save_pipeline_folder(model: BaseModel, folder: str | Path, scheduler_class: str = "PNDMScheduler") -> Path:
    """``model`` as a diffusers pipeline folder (``model_index.json``, unet/, vae/, text_encoder/, tokenizer/,
    scheduler/) that ``load_base`` and diffusers' ``StableDiffusionPipeline.from_pretrained`` both read.
    For handing a loaded model to another process (a training job, a benchmark's reference)."""
    folder = Path(folder)
    model.unet.save_pretrained(folder / "unet")
    model.vae.save_pretrained(folder / "vae")
    model.text_encoder.save_pretrained(folder / "text_encoder")
    model.tokenizer.save_pretrained(folder / "tokenizer")
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(model.scheduler_config))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", scheduler_class],
    }
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


# Files shipped in the repository stay under this size (git hosts refuse or slow down on big blobs);
# diffusers and our loaders read the shards through their index file.
SHIPPED_SHARD_SIZE = "15MB"


def reshard_for_shipping(component_dir: str | Path, model_class) -> None:
    """Rewrite a diffusers component folder's single weights file as shards of SHIPPED_SHARD_SIZE,
    tensor for tensor the same (checked), in the folder's dtype."""
    import torch
    from safetensors.torch import load_file

    component_dir = Path(component_dir)
    single = component_dir / "diffusion_pytorch_model.safetensors"
    if not single.is_file():
        return
    before = load_file(single)
    dtype = next(iter(before.values())).dtype
    module = model_class.from_pretrained(component_dir, torch_dtype=dtype)
    single.unlink()
    module.save_pretrained(component_dir, safe_serialization=True, max_shard_size=SHIPPED_SHARD_SIZE)
    after = model_class.from_pretrained(component_dir, torch_dtype=dtype).state_dict()
    if set(after) != set(before) or not all(torch.equal(before[k], after[k]) for k in before):
        raise RuntimeError(f"{component_dir}: the shards do not hold the same tensors")
