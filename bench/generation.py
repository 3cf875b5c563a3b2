"""Generation speed: the histolab engine against a plain diffusers pipeline.

Both run the same networks (the very same module objects), the same scheduler,
prompt, size, steps, guidance and per-image seeds, in the same process; calls
alternate between them (ABBA order across rounds) and the medians are printed,
with images/s and the ratio engine / diffusers (above 1: the engine is faster).
The "max |diff|" column compares the engine's pixels with diffusers' for the
same seeds (a few levels at most: they do the same work). Two more ratios help
on a shared machine, where other jobs stretch some calls: "by fastest" (best
call against best call: noise only ever adds time) and, on CPU, "by CPU time"
(median CPU seconds of this process per call: time spent waiting for a core
is not counted).

Profiles (``--profile auto`` picks gpu when CUDA is available):

* ``cpu``: the embedded default at 64x64, 25 steps, guidance 7.5, DPM++ 2M
  Karras, batch 1 and 4, float32. If checkpoints/embedded-base is absent the
  EMBEDDED architecture with random weights is used (it times the same) and
  the header says so. The engine is measured with and without channels_last,
  and on its ``--dtype auto`` path (histolab.precision: bfloat16 networks and a
  traced U-Net on CPUs with avx512_bf16/AMX), before and after the U-Net is
  compiled ahead of time for the bench's shapes (histolab.compiled_unet; the
  packages are built first where missing, untimed, and kept in histolab's cache);
  lines after the table give each auto path's time divided by plain diffusers'
  float32 time (the CPU fast path's target is at most 0.5). Then ``python
  app.py`` is started in a subprocess, and a visitor asks for 4 images at 15
  steps as soon as the page answers: seconds from the process's start to the
  page and to the images, with the model loaded on the first request in
  float32 (as before), and preloaded in the background on the auto path
  without compiled packages (a machine's first start), with them but no
  start-up worker, and with them and the start-up bundle that ``compile-unet``
  writes, whose worker makes the first images (histolab.startup_worker; later
  starts); each case ``--startup-repeats`` times, interleaved (``--startup
  off`` skips it).
* ``gpu``: SD-1.5-shaped random-init networks at 512x512, 30 steps, guidance
  7.5, batch 1 and 8, fp16 and bf16. Also prints the fraction of the compute
  floor reached: per image, steps x 2 (guided) U-Net passes + one VAE decode,
  at 0.86 TFLOP per SD-1.5 U-Net pass and 2.5 TFLOP per decode at 512x512,
  on 989 TFLOP/s (H100/H200 dense bf16/fp16): about 55 ms per image. For other
  shapes the FLOPs are counted with torch's FlopCounterMode on meta tensors.

Smoke test of the gpu path on CPU (what tests/test_bench_generation.py runs):
``python bench/generation.py --profile gpu --device cpu --arch tiny --size 32 --steps 2 --repeats 1``

The channels_last decision for CPU rests on the per-call comparison this
script prints under the table (many alternating calls of one network each,
steadier on a busy machine than whole generations); see
histolab.pipeline.optimize_for_inference for the outcome.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import histolab  # noqa: F401  (torchvision shim before diffusers)

# The constants for SD 1.5 at 512x512 (see the module docstring).
SD15_UNET_TFLOP = 0.86
SD15_VAE_DECODE_TFLOP = 2.5
PEAK_TFLOPS = 989.0  # H100 / H200 SXM, dense bf16 / fp16 tensor cores

PROMPT = "an h&e stained histology image of colon tissue"
NEGATIVE = "blurry, out of focus"


@dataclass(frozen=True)
class Settings:
    profile: str
    arch: str
    device: str
    size: int
    steps: int
    guidance: float
    scheduler: str
    batch_sizes: tuple[int, ...]
    dtypes: tuple[str, ...]
    repeats: int
    channels_last: str  # "both", "on", "off", "auto"
    compile: bool
    peak_tflops: float
    threads: int
    layout_calls: int
    auto: bool = True
    compiled: bool = True
    startup: bool = False
    startup_steps: int = 15
    startup_images: int = 4
    startup_repeats: int = 3


def parse_args(argv=None) -> Settings:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", choices=("auto", "cpu", "gpu"), default="auto", help="defaults for each setting")
    p.add_argument("--arch", choices=("embedded", "sd15", "tiny"), help="network shapes (cpu: embedded, gpu: sd15)")
    p.add_argument("--device", help="torch device (cpu profile: cpu; gpu profile: cuda)")
    p.add_argument("--size", type=int, help="image side in pixels (cpu: 64, gpu: 512)")
    p.add_argument("--steps", type=int, help="denoising steps (cpu: 25, gpu: 30)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--scheduler", default="dpmpp_2m_karras", help="sampler name (histolab.schedulers)")
    p.add_argument("--batch-sizes", help="comma-separated (cpu: 1,4; gpu: 1,8)")
    p.add_argument("--dtypes", help="comma-separated float32,float16,bfloat16 (cpu: float32; gpu: float16,bfloat16)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per variant and setting (medians printed)")
    p.add_argument(
        "--channels-last",
        choices=("both", "on", "off", "auto"),
        default="both",
        help="engine memory format: measure both, force one, or optimize_for_inference's choice",
    )
    p.add_argument("--compile", action="store_true", help="also time the engine with a torch.compile'd U-Net")
    p.add_argument(
        "--no-auto",
        dest="auto",
        action="store_false",
        help="cpu profile: skip the engine's --dtype auto path (bfloat16 + traced U-Net where the CPU supports it)",
    )
    p.add_argument(
        "--no-compiled",
        dest="compiled",
        action="store_false",
        help="cpu profile: skip the compiled U-Net (histolab.compiled_unet) on the auto path",
    )
    p.add_argument(
        "--startup",
        choices=("on", "off"),
        default=None,
        help="time app start to first image (python app.py in a subprocess, preloaded vs lazy; cpu profile: on)",
    )
    p.add_argument("--startup-steps", type=int, default=15, help="steps of the first request in the start-up timing")
    p.add_argument("--startup-images", type=int, default=4, help="images of the first request in the start-up timing")
    p.add_argument("--startup-repeats", type=int, default=3, help="runs of each start-up case (interleaved)")
    p.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS, help="device peak for the compute floor")
    p.add_argument(
        "--layout-calls", type=int, default=40, help="alternating network calls for the memory-format comparison"
    )
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads (default: every core)")
    a = p.parse_args(argv)
    profile = a.profile if a.profile != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
    gpu = profile == "gpu"
    return Settings(
        profile=profile,
        arch=a.arch or ("sd15" if gpu else "embedded"),
        device=a.device or ("cuda" if gpu else "cpu"),
        size=a.size or (512 if gpu else 64),
        steps=a.steps or (30 if gpu else 25),
        guidance=a.guidance,
        scheduler=a.scheduler,
        batch_sizes=tuple(int(x) for x in (a.batch_sizes or ("1,8" if gpu else "1,4")).split(",")),
        dtypes=tuple((a.dtypes or ("float16,bfloat16" if gpu else "float32")).split(",")),
        repeats=a.repeats,
        channels_last=a.channels_last,
        compile=a.compile,
        peak_tflops=a.peak_tflops,
        threads=a.threads,
        layout_calls=a.layout_calls,
        auto=a.auto,
        compiled=a.compiled,
        startup=(a.startup or ("off" if gpu else "on")) == "on",
        startup_steps=a.startup_steps,
        startup_images=a.startup_images,
        startup_repeats=a.startup_repeats,
    )


def build_model(s: Settings, dtype):
    """(model, description of the weights)."""
    from histolab.embedded.random_init import random_base
    from histolab.errors import ModelNotFound
    from histolab.pipeline import load_base

    if s.arch == "embedded":
        try:
            return load_base("embedded", device=s.device, dtype=dtype), "trained weights (checkpoints/embedded-base)"
        except ModelNotFound:
            pass
        why = "random-init weights of the EMBEDDED architecture (checkpoints/embedded-base absent; times the same)"
        return random_base("embedded", device=s.device, dtype=dtype), why
    return random_base(
        s.arch, device=s.device, dtype=dtype
    ), f"random-init weights of the {s.arch.upper()} architecture"


def diffusers_pipeline(model, scheduler_name: str):
    from diffusers import StableDiffusionPipeline

    from histolab.schedulers import build_scheduler

    pipe = StableDiffusionPipeline(
        vae=model.vae,
        text_encoder=model.text_encoder,
        tokenizer=model.tokenizer,
        unet=model.unet,
        scheduler=build_scheduler(scheduler_name, model.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_diffusers(pipe, req):
    import torch

    gens = [torch.Generator("cpu").manual_seed(req.seed + i) for i in range(req.batch_size)]
    return pipe(
        prompt=req.prompt,
        negative_prompt=req.negative_prompt,
        num_images_per_prompt=req.batch_size,
        num_inference_steps=req.steps,
        guidance_scale=req.guidance_scale,
        height=req.height,
        width=req.width,
        generator=gens if len(gens) > 1 else gens[0],
        output_type="pil",
    ).images


def run_engine(model, req):
    from histolab.generation import generate

    return [g.image for g in generate(model, req)]


def floor_seconds_per_image(s: Settings, model) -> tuple[float, str]:
    """The compute floor per image and where its FLOP counts came from."""
    passes = s.steps * (2 if s.guidance != 1.0 else 1)
    if s.arch == "sd15" and s.size == 512:
        unet, vae, src = SD15_UNET_TFLOP * 1e12, SD15_VAE_DECODE_TFLOP * 1e12, "issue constants"
    else:
        unet, vae = count_flops(model, s.size)
        src = "FlopCounterMode"
    return (passes * unet + vae) / (s.peak_tflops * 1e12), src


def count_flops(model, size: int) -> tuple[float, float]:
    """FLOPs of one U-Net pass and one VAE decode at ``size``, counted on meta tensors (no compute)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(model.unet.config)
        vae = AutoencoderKL.from_config(model.vae.config)
    lat = size // model.vae_scale_factor
    x = torch.empty(1, model.unet.config.in_channels, lat, lat, device="meta")
    emb = torch.empty(1, model.tokenizer.model_max_length, model.cross_attention_dim, device="meta")
    with FlopCounterMode(display=False) as fc:
        unet(x, torch.tensor(500, device="meta"), encoder_hidden_states=emb)
    u = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        vae.decode(x)
    return float(u), float(fc.get_total_flops())


def max_pixel_diff(a, b) -> int:
    import numpy as np

    return max(int(np.abs(np.asarray(x, np.int16) - np.asarray(y, np.int16)).max()) for x, y in zip(a, b, strict=True))


def measure(s: Settings, model, pipe, variants, bs: int, floor, sync) -> tuple[list[str], dict[str, float]]:
    """Time every variant at batch size ``bs``, interleaved; one printed line per variant, and the
    median seconds per call of each."""
    from histolab.generation import GenerationRequest
    from histolab.pipeline import optimize_for_inference

    req = GenerationRequest(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        guidance_scale=s.guidance,
        steps=s.steps,
        scheduler=s.scheduler,
        width=s.size,
        height=s.size,
        batch_size=bs,
        seed=1234,
    )

    def prepare(variant):
        # Untimed: the shared modules get the layout this variant runs with
        # (plain diffusers: PyTorch's default, contiguous).
        if variant[2] is None or variant[2] is model:
            optimize_for_inference(model, channels_last=variant[1])

    def run(variant):
        return run_diffusers(pipe, req) if variant[2] is None else run_engine(variant[2], req)

    # Warm-up (allocator, oneDNN/cuDNN algorithm choice, compile), and the pixel check.
    prepare(variants[0])
    reference = run(variants[0])
    diffs = {"diffusers": 0}
    for v in variants[1:]:
        prepare(v)
        diffs[v[0]] = max_pixel_diff(run(v), reference)
    wall: dict[str, list[float]] = {v[0]: [] for v in variants}
    cpu: dict[str, list[float]] = {v[0]: [] for v in variants}
    for r in range(s.repeats):
        order = variants if r % 2 == 0 else variants[::-1]  # ABBA: drift hits every variant alike
        for v in order:
            prepare(v)
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            run(v)
            sync()
            wall[v[0]].append(time.perf_counter() - t0)
            cpu[v[0]].append(time.process_time() - c0)
    base, base_best, base_cpu = (
        f(x["diffusers"]) for f, x in ((statistics.median, wall), (min, wall), (statistics.median, cpu))
    )
    lines = []
    for label, _, _ in variants:
        med = statistics.median(wall[label])
        line = (
            f"{bs:>5}  {label:<34}{med:>9.3f}{bs / med:>10.2f}{base / med:>14.2f}{base_best / min(wall[label]):>12.2f}"
        )
        if not on_gpu(s):
            line += f"{base_cpu / statistics.median(cpu[label]):>12.2f}"
        line += f"{diffs[label]:>12}"
        if floor is not None:
            line += f"{floor * bs / med:>10.1%}"
        lines.append(line)
    return lines, {label: statistics.median(wall[label]) for label, _, _ in variants}


def on_gpu(s: Settings) -> bool:
    import torch

    return torch.device(s.device).type == "cuda"


def layout_lines(model, s: Settings, bs: int, sync, calls: int = 40) -> list[str]:
    """U-Net pass (the guided batch, 2 x bs) and one VAE decode, contiguous vs channels_last:
    ``calls`` alternating calls each, medians. Finer-grained than whole generations, so the
    layout decision rests on many samples even on a busy machine."""
    import torch

    from histolab.pipeline import optimize_for_inference

    lat = s.size // model.vae_scale_factor
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * bs, model.unet.config.in_channels, lat, lat, generator=g).to(model.device, model.dtype)
    emb = torch.randn(2 * bs, model.tokenizer.model_max_length, model.cross_attention_dim, generator=g)
    emb = emb.to(model.device, model.dtype)
    t = torch.tensor(500, device=model.device)
    jobs = {
        "U-Net pass": lambda: model.unet(x, t, encoder_hidden_states=emb).sample,
        "VAE decode": lambda: model.vae.decode(x[:1]).sample,
    }
    lines = []
    for name, job in jobs.items():
        times: dict[bool, list[float]] = {False: [], True: []}
        with torch.inference_mode():
            for i in range(calls + 2):
                for cl in (False, True) if i % 2 == 0 else (True, False):
                    optimize_for_inference(model, channels_last=cl)
                    sync()
                    t0 = time.perf_counter()
                    job()
                    sync()
                    if i >= 2:  # the first two rounds warm up
                        times[cl].append(time.perf_counter() - t0)
        a, b = statistics.median(times[False]), statistics.median(times[True])
        what = f"{name} (batch {2 * bs})" if name == "U-Net pass" else f"{name} (1 image)"
        lines.append(
            f"  {what:<24} contiguous {a * 1e3:8.2f} ms   channels_last {b * 1e3:8.2f} ms   ratio {a / b:5.2f}"
        )
    optimize_for_inference(model, channels_last=False)
    return lines


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def time_startup(
    s: Settings, preload: bool, dtype: str, env_extra: dict[str, str] | None = None
) -> tuple[float, float]:
    """``python app.py`` in a subprocess; a visitor asks for the first images as soon as the page answers.
    Returns (seconds to the page answering, seconds to the first images), both from the process's start."""
    import subprocess
    import tempfile
    import urllib.request

    from gradio_client import Client  # imported before the clock starts: the visitor's side

    root = Path(__file__).resolve().parent.parent
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    with tempfile.TemporaryDirectory(prefix="histolab-startup-") as data:
        env = {
            **os.environ,
            "GRADIO_SERVER_PORT": str(port),
            "GRADIO_SERVER_NAME": "127.0.0.1",
            "HISTOLAB_DATA_DIR": data,
            "HISTOLAB_PRELOAD": "1" if preload else "0",
            "HISTOLAB_DTYPE": dtype,
            "HISTOLAB_DEVICE": s.device,
            "HISTOLAB_COMPILE_UNET": "0",  # no background compile stealing the cores mid-measurement
            **(env_extra or {}),
        }
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, str(root / "app.py")], cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            while True:  # poll the page the way a browser retrying would
                if proc.poll() is not None:
                    raise RuntimeError(f"app.py exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
                try:
                    with urllib.request.urlopen(url, timeout=5) as r:
                        if r.status == 200:
                            break
                except OSError:
                    time.sleep(0.05)
            up = time.perf_counter() - t0
            client = Client(url, verbose=False)
            args = ["embedded", "prompt", PROMPT, NEGATIVE, None] + ["(none)", 1.0] * 3
            args += [s.startup_steps, s.guidance, s.scheduler, 0, s.startup_images, "(none)"]
            gallery = client.predict(*args, api_name="/generate")[0]
            first = time.perf_counter() - t0
            if len(gallery) != s.startup_images:
                raise RuntimeError(f"the app returned {len(gallery)} images, not {s.startup_images}")
            return up, first
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def startup_lines(s: Settings) -> list[str]:
    """Each start-up case ``s.startup_repeats`` times, the cases interleaved round by round (this machine's
    load drifts); the median and every run are printed."""
    import subprocess
    import tempfile

    from histolab.compiled_unet import cache_dir

    lines = [
        f"app start to first image: python app.py, then {s.startup_images} images at {s.startup_steps} steps "
        "asked for as soon as the page answers (seconds from the process's start; medians of "
        f"{s.startup_repeats} interleaved runs, each run in brackets)"
    ]
    with tempfile.TemporaryDirectory(prefix="histolab-no-packages-") as empty:
        cases = [
            ("model loaded on the first request, float32 (before)", False, "float32", {}),
            (
                "model preloaded in the background, dtype auto, no compiled U-Net (a machine's first start)",
                True,
                "auto",
                {"HISTOLAB_COMPILED_CACHE": empty},
            ),
        ]
        if s.compiled:
            # What the app's background compile leaves behind: the packages and the start-up bundle.
            root = Path(__file__).resolve().parent.parent
            t0 = time.perf_counter()
            out = subprocess.run(
                [sys.executable, "-m", "histolab", "compile-unet", "--base", "embedded"],
                cwd=root,
                capture_output=True,
                text=True,
            )
            if out.returncode != 0:
                raise RuntimeError(f"compile-unet failed: {out.stderr[-2000:]}")
            last = out.stdout.strip().splitlines()[-2:]
            lines.append(f"  (compile-unet --base embedded, {time.perf_counter() - t0:.0f} s: {'; '.join(last)})")
            cases += [
                (
                    "model preloaded, dtype auto, compiled U-Net packages, no start-up worker",
                    True,
                    "auto",
                    {"HISTOLAB_STARTUP_WORKER": "0"},
                ),
                (
                    f"model preloaded, dtype auto, packages and start-up bundle in {cache_dir()} (later starts)",
                    True,
                    "auto",
                    {},
                ),
            ]
        runs: dict[str, list[tuple[float, float]]] = {label: [] for label, *_ in cases}
        for _ in range(s.startup_repeats):
            for label, preload, dtype, extra in cases:
                runs[label].append(time_startup(s, preload, dtype, extra))
    for label, got in runs.items():
        up = statistics.median(u for u, _ in got)
        first = statistics.median(f for _, f in got)
        each = ", ".join(f"{f:.2f}" for _, f in got)
        lines.append(f"  {label}\n  {'':<56} page up {up:6.2f} s   first image {first:6.2f} s   [{each}]")
    return lines


def auto_engine(s: Settings, compiled: bool = False):
    """The engine as ``--dtype auto`` sets it up on this machine (histolab.precision): (model, label).
    ``compiled``: with the U-Net compiled ahead of time for the bench's shapes (histolab.compiled_unet),
    built first where missing (untimed; the build time is printed)."""
    from histolab.pipeline import optimize_for_inference
    from histolab.precision import auto_dtype_name, detect_cpu_bf16

    cpu = detect_cpu_bf16()
    if not compiled:
        print(f"--dtype auto on {s.device}: {cpu.describe() if s.device == 'cpu' else auto_dtype_name(s.device)}")
    import torch

    model, _ = build_model(s, getattr(torch, auto_dtype_name(s.device, cpu)))
    optimize_for_inference(model, aot=compiled)
    name = str(model.dtype).removeprefix("torch.")
    if compiled and model.compiled_unets is not None:
        from histolab.compiled_unet import app_shapes, build_missing

        t0 = time.perf_counter()
        built = build_missing(model, app_shapes(model, s.batch_sizes, s.size), log=lambda line: print("  " + line))
        print(
            f"compiled U-Net packages in {model.compiled_unets.root}: {len(built)} built now "
            f"({time.perf_counter() - t0:.1f} s), the rest found there"
        )
        return model, f"engine auto ({name}, compiled)"
    extras = [name] + (["traced"] if model.optimizations.get("trace") else [])
    return model, "engine auto (" + ", ".join(extras) + ")"


def main(argv=None) -> int:
    import torch

    from histolab.pipeline import optimize_for_inference

    s = parse_args(argv)
    torch.set_num_threads(s.threads)
    gpu = s.profile == "gpu"
    cuda = torch.device(s.device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    print(
        f"bench/generation.py profile={s.profile} device={s.device} torch={torch.__version__} "
        f"threads={torch.get_num_threads()}" + (f" gpu={torch.cuda.get_device_name()}" if cuda else "")
    )
    if not cuda and gpu:
        print("note: gpu profile on a non-CUDA device: a smoke run of the code path; the figures are not GPU figures")

    for dtype_name in s.dtypes:
        dtype = getattr(torch, dtype_name)
        model, weights = build_model(s, dtype)
        pipe = diffusers_pipeline(model, s.scheduler)
        # Engine variants: (label, channels_last, the model object it runs on).
        layouts = {"both": (False, True), "on": (True,), "off": (False,)}.get(s.channels_last)
        if layouts is None:  # auto: what optimize_for_inference picks for this device
            layouts = (cuda,)
        variants = [("diffusers", False, None)] + [
            ("engine" + ("+channels_last" if cl else ""), cl, model) for cl in layouts
        ]
        auto_labels = []
        if s.auto and not gpu and dtype_name == "float32":
            auto_model, label = auto_engine(s)
            variants.append((label, False, auto_model))
            auto_labels.append(label)
            if s.compiled and auto_model.optimizations.get("trace"):
                compiled_model, label = auto_engine(s, compiled=True)
                if compiled_model.compiled_unets is not None:
                    variants.append((label, False, compiled_model))
                    auto_labels.append(label)
        if s.compile:
            # Its own copies of the networks: compiling and layout changes stay out of the other variants.
            compiled = replace(
                model, unet=copy.deepcopy(model.unet), vae=copy.deepcopy(model.vae), lock=type(model.lock)()
            )
            optimize_for_inference(compiled, channels_last=layouts[-1], compile=True)
            variants.append(("engine+compile" + ("+channels_last" if layouts[-1] else ""), layouts[-1], compiled))
        floor, floor_src = floor_seconds_per_image(s, model) if gpu else (None, "")
        print(
            f"\n{s.arch} {weights}; {dtype_name}, {s.size}x{s.size}, {s.steps} steps, guidance {s.guidance}, "
            f"{s.scheduler}, {s.repeats} timed calls per variant (interleaved), medians"
        )
        if floor is not None:
            print(f"compute floor: {floor * 1e3:.3g} ms/image ({floor_src}, peak {s.peak_tflops:g} TFLOP/s)")
        header = f"{'batch':>5}  {'variant':<34}{'s/call':>9}{'images/s':>10}{'vs diffusers':>14}{'by fastest':>12}"
        header += "" if cuda else f"{'by CPU time':>12}"
        print(header + f"{'max |diff|':>12}" + (f"{'of floor':>10}" if floor is not None else ""))

        medians = {}
        for bs in s.batch_sizes:
            lines, medians[bs] = measure(s, model, pipe, variants, bs, floor, sync)
            for line in lines:
                print(line, flush=True)
        for auto_label in auto_labels:
            print(
                f"engine auto path ({auto_label}) time / plain diffusers {dtype_name} time, medians: "
                + ", ".join(f"batch {bs}: {medians[bs][auto_label] / medians[bs]['diffusers']:.2f}" for bs in medians)
                + " (target <= 0.5)",
                flush=True,
            )
        if s.channels_last == "both":
            print(
                f"memory format, per network call ({s.layout_calls} alternating calls each, medians; "
                "ratio > 1: channels_last faster)"
            )
            for bs in s.batch_sizes:
                for line in layout_lines(model, s, bs, sync, s.layout_calls):
                    print(line, flush=True)
        del model, pipe, variants
    if s.startup:
        print()
        for line in startup_lines(s):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
