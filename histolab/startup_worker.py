"""``python -m histolab.startup_worker``: the process that makes the app's first images.

The app starts it first thing (app.py), before importing gradio, when a start-up bundle exists for
its base model (histolab.startup_bundle; ``compile-unet`` writes it). It imports torch and
transformers' tokenizer only, loads the bundle (compiled U-Net packages, traced text encoder and
decoder) and runs histolab.generation's own ``generate`` on it, with histolab.dpm_solver as the
sampler: the same code as the app's model, on kernels that give the same bits, so an image and its
recipe are the ones the app's model would make (tests/test_startup_worker.py compares them). It serves
until the app's own model is loaded, then the app closes it.

It declines (and the app's model serves) whatever its bundle cannot make exactly: other samplers,
adapters, reference mode, other sizes or batch sizes than those compiled, ATen-kernel re-runs.

Talk goes over stdin/stdout in frames (histolab.startup_client): a little-endian u32 length, a JSON
header, then the raw payloads the header lists (RGB pixels). Nothing is unpickled.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import struct
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

PROMPTS_KEPT = 64


def send(stream, header: dict[str, Any], payloads: list[bytes] | tuple = ()) -> None:
    head = json.dumps({**header, "payloads": [len(p) for p in payloads]}).encode()
    stream.write(struct.pack("<I", len(head)) + head)
    for p in payloads:
        stream.write(p)
    stream.flush()


def _exactly(stream, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = stream.read(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def receive(stream) -> tuple[dict[str, Any], list[bytes]] | None:
    """The next frame, or None at the end of the stream."""
    size = _exactly(stream, 4)
    if size is None:
        return None
    head = _exactly(stream, struct.unpack("<I", size)[0])
    if head is None:
        return None
    header = json.loads(head)
    payloads = []
    for n in header.pop("payloads", []):
        p = _exactly(stream, n)
        if p is None:
            return None
        payloads.append(p)
    return header, payloads


class _Config(dict):
    """A U-Net config as ``CompiledUNets`` reads it: a mapping with attribute access."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class _Decoders:
    """``vae.decode(z).sample`` through the traced decoder of z's size."""

    def __init__(self, bundle: Path, manifest: dict[str, Any]):
        import torch

        self.config = SimpleNamespace(scaling_factor=manifest["vae_scaling_factor"])
        self._graphs = {k: torch.jit.load(str(bundle / name)) for k, name in manifest["decoders"].items()}

    def sizes(self) -> set[str]:
        return set(self._graphs)

    def decode(self, z):
        return SimpleNamespace(sample=self._graphs[f"{z.shape[-2]}x{z.shape[-1]}"](z))


class _PackagesOnly:
    """In place of the traced U-Net: this model runs compiled packages only (serve checks first)."""

    def usable(self, model) -> bool:
        return True

    def bind(self, model, tag=()):
        def missing(x, t, e):
            raise RuntimeError(f"the start-up worker has no compiled U-Net for inputs of shape {tuple(x.shape)}")

        return missing


class BundleModel:
    """What histolab.generation asks of a base model, from a start-up bundle."""

    def __init__(self, bundle: Path, manifest: dict[str, Any]):
        import torch
        from transformers import CLIPTokenizer

        from histolab.compiled_unet import CompiledUNets

        m = manifest
        self.source, self.name, self.hash = m["source"], m["name"], m["base_hash"]
        self.device, self.dtype = "cpu", getattr(torch, m["dtype"])
        self.lock = threading.RLock()
        self.applied: list = []
        self.conditioners: dict = {}
        self.optimizations = {"compile": False, "trace": True, "aot": True, "startup_worker": True}
        self.scheduler_config = m["scheduler_config"]
        self.vae_scale_factor, self.size_multiple = m["vae_scale_factor"], m["size_multiple"]
        self.default_size, self.cross_attention_dim = m["default_size"], m["cross_attention_dim"]
        self.unet = SimpleNamespace(config=_Config(m["unet_config"]), named_modules=lambda: iter(()))
        self.tokenizer = CLIPTokenizer.from_pretrained(Path(m["folder"]) / "tokenizer", local_files_only=True)
        hidden = torch.jit.load(str(bundle / m["text_encoder"]))
        self.text_encoder = lambda ids: (hidden(ids),)  # as transformers' model returns it: a tuple
        self.vae = _Decoders(bundle, m)
        self.traced_unet = _PackagesOnly()
        digest = m["unet_digest"]
        self.compiled_unets = CompiledUNets(Path(m["packages"]))
        self.compiled_unets.digest = lambda unet: digest  # the bundle's record of the weights it was made from
        self._prompts: dict[str, Any] = {}

    def make_scheduler(self, name: str, config: dict[str, Any]):
        from histolab import dpm_solver

        return dpm_solver.build(name, config)

    def encode_prompt(self, prompts: list[str]):
        from histolab.base_model import BaseModel

        return BaseModel.encode_prompt(self, prompts)

    def prompt_embedding(self, prompt: str):
        hit = self._prompts.get(prompt)
        if hit is None:
            hit = self._prompts[prompt] = self.encode_prompt([prompt])
            while len(self._prompts) > PROMPTS_KEPT:
                self._prompts.pop(next(iter(self._prompts)))
        return hit

    def declines(self, req) -> str:
        """Why this model does not make ``req`` exactly as the app's own would ('' when it does)."""
        from histolab import dpm_solver

        if req.mode != "prompt":
            return "reference mode"
        if req.adapters:
            return "adapters"
        if req.kernels != "auto":
            return f"kernels {req.kernels!r}"
        why = dpm_solver.unsupported(req.scheduler, self.scheduler_config)
        if why:
            return why
        lat_h, lat_w = req.height // self.vae_scale_factor, req.width // self.vae_scale_factor
        if f"{lat_h}x{lat_w}" not in self.vae.sizes():
            return f"size {req.width}x{req.height}"
        n = req.batch_size
        rows = 2 * n if req.guidance_scale != 1.0 else (2 if n == 1 else n)
        x_shape = (rows, int(self.unet.config.in_channels), lat_h, lat_w)
        if (
            self.compiled_unets.runner(self, x_shape, (self.tokenizer.model_max_length, self.cross_attention_dim))
            is None
        ):
            return f"no compiled U-Net for {rows} rows"
        return ""


def load(base: str, device: str, dtype: str, root: Path | None = None) -> BundleModel:
    """The bundle for ``base`` as the app would load it (``device``/``dtype`` settings), checked."""
    import torch

    from histolab import startup_bundle
    from histolab.pipeline import resolve_device
    from histolab.precision import auto_dtype_name, check_dtype_name

    dev = resolve_device(device)
    if torch.device(dev).type != "cpu":
        raise ValueError(f"the app runs on {dev}; the start-up worker serves the CPU path only")
    name = auto_dtype_name(dev) if check_dtype_name(dtype) == "auto" else dtype
    bundle = startup_bundle.bundle_dir(base, name, root)
    manifest = startup_bundle.read(bundle)
    return BundleModel(bundle, manifest)


def _threads() -> int:
    # As the app's own model thread sets them with no job running (histolab.threads.ThreadShare): CPU
    # kernels split their sums by thread, so the same count gives the same bits.
    from histolab.threads import available_cores, user_threads

    return user_threads() or available_cores()


def warm_up(model: BundleModel, batches: list[int]) -> None:
    """One guided step at each batch size it can make: the first call's costs (loading a package,
    oneDNN's kernel choice, the allocator) are paid before the first visitor's request."""
    import torch

    from histolab.generation import GenerationRequest, generate

    # One thread: the app's process is importing gradio on the other core meanwhile, and three busy threads on
    # two cores slow both. What the warm-up is for (loading the packages, TorchScript's first-run profiling)
    # does not depend on the thread count; serve() sets the app's count for the images themselves.
    torch.set_num_threads(1)
    for b in batches:
        req = GenerationRequest(prompt="warm-up", steps=1, batch_size=b).validate(model)
        if not model.declines(req):
            generate(model, req)


def serve(model: BundleModel, inp, out) -> None:
    """Answer ``generate`` frames until ``inp`` ends; a ``cancel`` frame naming a job's id stops it."""
    import torch

    from histolab.errors import Cancelled, InvalidRequest
    from histolab.generation import GenerationRequest, generate

    torch.set_num_threads(_threads())
    jobs: queue.Queue = queue.Queue()
    cancelled: set = set()  # ids of jobs a cancel frame named (it may arrive before the job starts)

    def read() -> None:
        while (frame := receive(inp)) is not None:
            if "cancel" in frame[0]:
                cancelled.add(frame[0]["cancel"])
            else:
                jobs.put(frame[0])
        jobs.put(None)

    threading.Thread(target=read, name="startup-worker-reader", daemon=True).start()
    while (job := jobs.get()) is not None:
        job_id = job.get("id")
        try:
            req = GenerationRequest(**job["generate"]).validate(model)
            why = model.declines(req)
            if why:
                send(out, {"decline": why})
                continue
            images = generate(
                model,
                req,
                progress=lambda d, n: send(out, {"progress": [d, n]}),
                cancel=lambda job_id=job_id: job_id in cancelled,
            )
        except (InvalidRequest, Cancelled) as exc:
            send(out, {"error": str(exc), "kind": type(exc).__name__})
            continue
        except Exception as exc:  # anything unexpected: the app's own model serves the request instead
            print(f"histolab startup worker: {type(exc).__name__}: {exc}", file=sys.stderr)
            send(out, {"decline": f"{type(exc).__name__}: {exc}"})
            continue
        header = [{"recipe": g.recipe.to_dict(), "size": list(g.image.size)} for g in images]
        send(out, {"images": header}, [g.image.convert("RGB").tobytes() for g in images])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m histolab.startup_worker", description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="embedded")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--cache-dir", type=Path, default=None, help="where the bundles are (default: histolab's cache)")
    p.add_argument("--warm", default="4,1", help="batch sizes to run one step of before saying ready")
    args = p.parse_args(argv)
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    sys.stdout = sys.stderr  # frames own the real stdout; stray prints go to the log
    t0 = time.perf_counter()
    try:
        model = load(args.base, args.device, args.dtype, args.cache_dir)
        warm_up(model, [int(b) for b in args.warm.split(",") if b.strip()])
    except Exception as exc:
        send(out, {"unusable": f"{type(exc).__name__}: {exc}" if not isinstance(exc, ValueError) else str(exc)})
        return 0
    send(out, {"ready": f"{model.name} in {model.dtype}".replace("torch.", ""), "seconds": time.perf_counter() - t0})
    serve(model, sys.stdin.buffer, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
