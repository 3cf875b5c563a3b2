"""The U-Net compiled ahead of time by TorchInductor (AOTInductor): the CPU fast path's fastest kernels.

The traced graph (histolab.traced) runs ATen's kernels one op at a time. Inductor's CPU backend
instead generates C++ for the whole pass with the elementwise work fused (group norms with their
SiLU, residual adds, attention reshapes) and the convolution and linear weights prepacked for oneDNN.
Measured on the 2-core machine of issue 14 (the embedded U-Net in bfloat16, 8 rows of 16x16 latents,
interleaved rounds): 40.4 ms per pass against 51.5 ms traced. Compiling costs about a minute per input
shape there (53-74 s), so it is done once, in the background (``python -m histolab compile-unet``,
started by the app after its preload), and the result is kept as a package file that loads in
about 0.03 s; until a package exists the traced graph runs.

Same images: the compiled kernels round differently from ATen's (the bfloat16 output of one pass
differs by at most 1/64 from the traced one), so recipes record which kernels made an image
(``Recipe.kernels``) and a re-run asks for the same. Within the compiled kernels, an image's bits do
not depend on the batch it was made in: the packages are built per number of rows, and a row's
result is the same in each (tests/test_compiled_unet.py). The time embedding is computed for one row
and broadcast, as histolab.generation does on CPU (all rows share the step's timestep).

A package is keyed by everything its code depends on: the U-Net's weights (a digest of their
bytes), its config, the dtype, the input shapes, the torch version and the CPU's vector ISA. Packages
are files this process or its builder wrote under ``$HISTOLAB_CACHE/compiled-unet`` (histolab.config.cache_root);
loading one runs its compiled code, so nothing else is ever loaded from there.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from histolab.config import cache_root
from histolab.traced import TIME_LINEAR, sample_module

KIND = "inductor-aot"  # Recipe.kernels of images made with a compiled U-Net; "" = ATen's kernels
FORMAT = 1


def cache_dir(env: dict[str, str] | None = None) -> Path:
    """$HISTOLAB_COMPILED_CACHE, else compiled-unet/ in histolab's cache (histolab.config.cache_root)."""
    own = (os.environ if env is None else env).get("HISTOLAB_COMPILED_CACHE")
    return Path(own) if own else cache_root(env) / "compiled-unet"


@dataclass(frozen=True)
class Shape:
    """The U-Net inputs a package serves: rows (the guided batch), latent channels, height and width,
    and the text embedding's tokens and width."""

    rows: int
    channels: int
    height: int
    width: int
    tokens: int
    dim: int

    def label(self) -> str:
        return f"{self.rows}x{self.channels}x{self.height}x{self.width}-e{self.tokens}x{self.dim}"


def weights_digest(unet) -> str:
    """sha256 over the U-Net's parameters and buffers (names, dtypes, shapes, bytes)."""
    import torch

    h = hashlib.sha256()
    for name, t in list(unet.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def vector_isa(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's vector extensions (a package must not run on a CPU without those it was compiled for).
    Read from /proc/cpuinfo rather than asked of Inductor, whose check compiles a test program (1.5 s
    of a start-up here); stricter than needed, never looser."""
    import platform

    flags: set[str] = set()
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith(("flags", "Features")):
                flags.update(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    vector = sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "sse4", "f16c", "asimd", "sve")))
    return platform.machine() + ":" + ",".join(vector)


def package_key(digest: str, config: dict, dtype, shape: Shape, isa: str | None = None) -> str:
    import torch

    doc = {
        "format": FORMAT,
        "weights": digest,
        "config": {k: v for k, v in sorted(dict(config).items()) if not k.startswith("_")},
        "dtype": str(dtype),
        "shape": shape.label(),
        "torch": torch.__version__,
        "isa": vector_isa() if isa is None else isa,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:32]


class _one_row_time:
    """Forward hooks on the time-embedding linears (the ``broadcast`` case of
    histolab.generation.batch_invariant_time_embedding, without its data-dependent check, which
    export cannot trace: here the timestep is always one for the whole batch)."""

    def __init__(self, unet):
        self.unet, self.handles = unet, []

    def __enter__(self):
        import torch

        rows: dict[int, int] = {}

        def before(mod, args):
            x = args[0]
            if x.dim() != 2:
                return None
            rows[id(mod)] = x.shape[0]
            return (x[:1], *args[1:])

        def after(mod, args, out):
            n = rows.pop(id(mod), None)
            return None if n is None else out.expand(n, *out.shape[1:])

        for name, mod in self.unet.named_modules():
            if isinstance(mod, torch.nn.Linear) and TIME_LINEAR.search(name):
                self.handles += [mod.register_forward_pre_hook(before), mod.register_forward_hook(after)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()


def build(unet, shape: Shape, dtype, path: Path) -> Path:
    """Export the U-Net for ``shape`` and compile it into the package ``path`` (written atomically)."""
    import torch
    import torch._inductor.config as inductor_config

    x = torch.randn(shape.rows, shape.channels, shape.height, shape.width, dtype=dtype)
    t = torch.tensor(500)
    e = torch.randn(shape.rows, shape.tokens, shape.dim, dtype=dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.pt2")
    freezing = inductor_config.freezing
    inductor_config.freezing = True  # weights are constants: folded and prepacked for oneDNN
    try:
        with torch.no_grad(), _one_row_time(unet):
            exported = torch.export.export(sample_module(unet).eval(), (x, t, e))
            torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp))
        os.replace(tmp, path)
    finally:
        inductor_config.freezing = freezing
        tmp.unlink(missing_ok=True)
    return path


class CompiledUNets:
    """The packages of one model (its weights as loaded): ``runner(model, x_shape, e_shape)`` gives the
    compiled U-Net for inputs of those shapes when its package exists, else None. Looked up per generation (one ``stat`` for a
    shape not loaded yet), so a package the background builder finishes is used from the next image on."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else cache_dir()
        self._digest: tuple[tuple, str] | None = None
        self._runners: dict[str, Any] = {}
        self._lock = threading.Lock()

    def digest(self, unet) -> str:
        versions = tuple((id(p), p._version) for p in unet.parameters())
        if self._digest is None or self._digest[0] != versions:
            self._digest = (versions, weights_digest(unet))
        return self._digest[1]

    def path(self, model, shape: Shape) -> Path:
        key = package_key(self.digest(model.unet), model.unet.config, model.dtype, shape)
        return self.root / f"unet-{shape.label()}-{key}.pt2"

    def runner(self, model, x_shape: tuple, e_shape: tuple):
        """The compiled U-Net for inputs of ``x_shape`` (rows, channels, height, width) and text
        embeddings of ``e_shape`` (tokens, width), or None while its package is not built."""
        if len(x_shape) != 4 or len(e_shape) != 2 or x_shape[0] < 2:
            return None
        path = self.path(model, Shape(*(int(v) for v in x_shape), *(int(v) for v in e_shape)))
        with self._lock:
            run = self._runners.get(path.name)
            if run is None and path.is_file():
                run = self._runners[path.name] = load(path)
        return run

    @property
    def loaded(self) -> int:
        """Packages loaded so far (each one a shape generation has run the compiled U-Net at)."""
        with self._lock:
            return sum(run is not None for run in self._runners.values())

    def missing(self, model, shapes: list[Shape]) -> list[Shape]:
        return [s for s in shapes if not self.path(model, s).is_file()]


def load(path: Path):
    """The package's model as ``run(x, t, e) -> eps``. Through the C++ loader itself, not
    ``torch._inductor.aoti_load_package``: that imports Inductor's Python (1.1 s of a start-up here)
    only to flatten the three inputs, which this does by hand (the export's signature is fixed)."""
    import torch

    loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)

    def run(x, t, e):
        return loader.boxed_run([x, t, e])[0]

    return run


def app_shapes(model, batches=(4, 1), size: int | None = None) -> list[Shape]:
    """The shapes a guided generation at ``batches`` images of ``size`` px runs the U-Net at."""
    size = size or model.default_size
    lat = size // model.vae_scale_factor
    tokens = int(getattr(model.tokenizer, "model_max_length", 77))
    c = int(model.unet.config.in_channels)
    return [Shape(2 * b, c, lat, lat, tokens, model.cross_attention_dim) for b in dict.fromkeys(batches)]


def build_missing(model, shapes: list[Shape], root: Path | None = None, log=print) -> list[Path]:
    """Compile every package of ``shapes`` not built yet for ``model``; returns the paths built."""
    import time

    units = CompiledUNets(root)
    built = []
    for shape in units.missing(model, shapes):
        t0 = time.perf_counter()
        path = build(model.unet, shape, model.dtype, units.path(model, shape))
        log(f"compiled the U-Net for {shape.label()} in {time.perf_counter() - t0:.1f} s: {path}")
        built.append(path)
    return built
