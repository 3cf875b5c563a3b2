"""``generate(model, request)``: images and their recipes.

Image i of a request uses seed ``seed + i``: its initial noise and every noise
draw of an ancestral sampler come from its own ``torch.Generator``, so an image
is the same whatever the batch size it is generated in. Classifier-free
guidance runs both branches in one U-Net batch; guidance 1.0 runs the
conditional branch alone.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from PIL import Image

from histolab.errors import Cancelled, InvalidRequest
from histolab.recipe import AdapterUse, Recipe
from histolab.schedulers import build_scheduler, check_name

ProgressCallback = Callable[[int, int], None]  # (step done, total steps)

MAX_BATCH = 64  # per call; larger runs go through generate_to_dir
MAX_STEPS = 1000
MAX_SIDE = 2048


@dataclass(frozen=True)
class AdapterSpec:
    """An adapter to apply for one request: a path or registry name, and a strength."""

    ref: str
    strength: float = 1.0


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str = ""
    negative_prompt: str = ""
    mode: str = "prompt"  # "prompt": text; "reference": a reference patch through an encoder adapter
    reference: Any = None  # PIL image, reference mode only
    guidance_scale: float = 7.5  # SD 1.5's usual; about 1.3 for reference mode
    steps: int = 50
    scheduler: str = "dpmpp_2m_karras"
    width: int | None = None  # None: the base model's native size
    height: int | None = None
    batch_size: int = 1
    seed: int = 0
    adapters: tuple[AdapterSpec, ...] = field(default_factory=tuple)

    def validate(self, model=None) -> GenerationRequest:
        """Check every field; return the request with sizes filled in. Names the bad value."""
        if self.mode not in ("prompt", "reference"):
            raise InvalidRequest(f"`mode` must be 'prompt' or 'reference' but is {self.mode!r}")
        if not isinstance(self.prompt, str) or not isinstance(self.negative_prompt, str):
            raise InvalidRequest("`prompt` and `negative_prompt` must be text")
        if self.mode == "reference" and self.reference is None:
            raise InvalidRequest("reference mode needs a reference patch (`reference` is empty)")
        if not (self.guidance_scale == self.guidance_scale) or self.guidance_scale < 0:  # NaN or negative
            raise InvalidRequest(f"`guidance_scale` must be >= 0 but is {self.guidance_scale}")
        if self.guidance_scale > 50:
            raise InvalidRequest(f"`guidance_scale` must be <= 50 but is {self.guidance_scale}")
        if not isinstance(self.steps, int) or not 1 <= self.steps <= MAX_STEPS:
            raise InvalidRequest(f"`steps` must be an integer from 1 to {MAX_STEPS} but is {self.steps!r}")
        check_name(self.scheduler)
        if not isinstance(self.batch_size, int) or not 1 <= self.batch_size <= MAX_BATCH:
            raise InvalidRequest(f"`batch_size` must be from 1 to {MAX_BATCH} but is {self.batch_size!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63 - MAX_BATCH:
            raise InvalidRequest(f"`seed` must be an integer from 0 to 2**63 - {MAX_BATCH} but is {self.seed!r}")
        for a in self.adapters:
            if not (-4.0 <= a.strength <= 4.0):
                raise InvalidRequest(f"adapter {a.ref!r}: strength must be between -4 and 4 but is {a.strength}")
        req = self
        if model is not None:
            size = model.default_size
            req = replace(self, width=self.width or size, height=self.height or size)
            m = model.size_multiple
            if req.width % m or req.height % m:
                raise InvalidRequest(
                    f"`height` and `width` have to be divisible by {m} but are {req.height} and {req.width}."
                )
        for name in ("width", "height"):
            v = getattr(req, name)
            if v is not None and not (isinstance(v, int) and 8 <= v <= MAX_SIDE):
                raise InvalidRequest(f"`{name}` must be an integer from 8 to {MAX_SIDE} but is {v!r}")
        return req


@dataclass
class GeneratedImage:
    image: Image.Image
    recipe: Recipe


def _is_cancelled(cancel) -> bool:
    if cancel is None:
        return False
    if isinstance(cancel, threading.Event):
        return cancel.is_set()
    return bool(cancel())


def text_conditioning(model, request: GenerationRequest, n: int):
    cond = model.encode_prompt([request.prompt] * n)
    uncond = model.encode_prompt([request.negative_prompt] * n)
    return cond, uncond


def generate(
    model,
    request: GenerationRequest,
    *,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | Callable[[], bool] | None = None,
    seeds: list[int] | None = None,
) -> list[GeneratedImage]:
    """Generate ``request.batch_size`` images (or one per seed in ``seeds``)."""
    with model.lock:
        if request.adapters:
            # Applied for this request only and removed after, under the model's
            # lock: one user's adapters never reach another user's images.
            from histolab.adapters import applied

            ctx = applied(model, request.adapters)
        else:
            ctx = contextlib.nullcontext([])
        with ctx as used:
            return _generate_locked(model, request, used, progress, cancel, seeds)


def _generate_locked(model, request, used: list[AdapterUse], progress, cancel, seeds) -> list[GeneratedImage]:
    import torch

    # 1. Check inputs.
    req = request.validate(model)
    seeds = list(seeds) if seeds is not None else [req.seed + i for i in range(req.batch_size)]
    n = len(seeds)
    do_cfg = req.guidance_scale != 1.0
    device, dtype = model.device, model.dtype

    # 2. Conditioning: text, or a reference patch through the encoder adapter.
    if req.mode == "prompt":
        cond, uncond = text_conditioning(model, req, n)
        reference_hash, encoder = "", ""
    else:
        conditioner = model.conditioners.get("reference")
        if conditioner is None:
            raise InvalidRequest(
                "reference mode needs a foundation-embedding adapter: add one with kind 'projector' to `adapters`"
            )
        cond, uncond, reference_hash, encoder = conditioner(model, req, n)

    # 3. Timesteps, from a fresh scheduler (schedulers keep per-run state).
    scheduler = build_scheduler(req.scheduler, model.scheduler_config)
    scheduler.set_timesteps(req.steps, device=device)
    timesteps = scheduler.timesteps
    # Deterministic samplers (PNDM) take no generator; ancestral ones draw noise from it.
    step_kwargs = {"generator": None} if "generator" in inspect.signature(scheduler.step).parameters else {}

    # 4. Initial latents: image i from its own generator seeded seeds[i].
    generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    if step_kwargs:
        step_kwargs["generator"] = generators
    shape = (model.unet.config.in_channels, req.height // model.vae_scale_factor, req.width // model.vae_scale_factor)
    latents = torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])
    latents = (latents * scheduler.init_noise_sigma).to(device=device, dtype=dtype)
    embeds = torch.cat([uncond, cond]) if do_cfg else cond

    # 5. Denoising loop.
    with torch.inference_mode():
        for i, t in enumerate(timesteps):
            if _is_cancelled(cancel):
                raise Cancelled(f"generation cancelled after {i} of {len(timesteps)} steps")
            x_in = torch.cat([latents, latents]) if do_cfg else latents
            x_in = scheduler.scale_model_input(x_in, t)
            eps = model.unet(x_in, t, encoder_hidden_states=embeds).sample
            if do_cfg:
                eps_uncond, eps_cond = eps.chunk(2)
                eps = eps_uncond + req.guidance_scale * (eps_cond - eps_uncond)
            latents = scheduler.step(eps, t, latents, **step_kwargs).prev_sample
            if progress is not None:
                progress(i + 1, len(timesteps))

        # 6. Decode, one image at a time: VAE decoding is the memory peak, and
        # per-image decoding keeps pixels independent of the batch size.
        images = []
        for j in range(n):
            x = model.vae.decode(latents[j : j + 1] / model.vae.config.scaling_factor).sample
            images.append(_to_pil(x[0]))

    # 7. Recipes.
    out = []
    for s, img in zip(seeds, images, strict=True):
        recipe = Recipe(
            base_model=model.name,
            base_hash=model.hash,
            prompt=req.prompt,
            negative_prompt=req.negative_prompt,
            mode=req.mode,
            reference_hash=reference_hash,
            encoder=encoder,
            guidance_scale=float(req.guidance_scale),
            steps=req.steps,
            scheduler=req.scheduler,
            width=req.width,
            height=req.height,
            seed=s,
            adapters=tuple(used),
        )
        out.append(GeneratedImage(img, recipe))
    return out


def _to_pil(x) -> Image.Image:
    arr = ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def request_from_recipe(recipe: Recipe, reference=None) -> GenerationRequest:
    """The request that reproduces one image of a recipe (batch of one at its seed)."""
    adapters = tuple(AdapterSpec(a.path or a.name, a.strength) for a in recipe.adapters)
    return GenerationRequest(
        prompt=recipe.prompt,
        negative_prompt=recipe.negative_prompt,
        mode=recipe.mode,
        reference=reference,
        guidance_scale=recipe.guidance_scale,
        steps=recipe.steps,
        scheduler=recipe.scheduler,
        width=recipe.width,
        height=recipe.height,
        batch_size=1,
        seed=recipe.seed,
        adapters=adapters,
    )
