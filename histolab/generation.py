"""``generate(model, request)``: images and their recipes.

Image i of a request uses seed ``seed + i``: its initial noise and every noise
draw of an ancestral sampler come from its own ``torch.Generator``, so an image
is the same whatever the batch size it is generated in: on CPU to the last bit
(see FIXED_ROWS) for a given number of threads (CPU kernels split their sums
by thread); on GPUs to within the kernels' rounding. Classifier-free guidance
runs both branches in one U-Net batch; guidance 1.0 runs the conditional
branch alone.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from PIL import Image

from histolab.adapters.spec import AdapterSpec
from histolab.compiled_unet import KIND as COMPILED_KIND
from histolab.errors import Cancelled, InvalidRequest, is_cancelled
from histolab.precision import dtype_name
from histolab.recipe import AdapterUse, Recipe
from histolab.schedulers import build_scheduler, check_name
from histolab.traced import TIME_LINEAR

ProgressCallback = Callable[[int, int], None]  # (step done, total steps)
# (step done, total steps, the latents after it): for live previews (histolab.preview); called in the
# denoising loop under the model's lock and inference mode, so it may run the model's VAE.
LatentsCallback = Callable[[int, int, Any], None]

MAX_BATCH = 64  # per call; larger runs go through generate_to_dir
MAX_STEPS = 1000
MAX_SIDE = 2048
KERNELS = ("auto", "aten")  # GenerationRequest.kernels

# Batch-size independence down to the last bit, on CPU. Its kernels are chosen
# by shape: a GEMM over 2 rows rounds differently from one over 8, and a
# convolution over one image differently from one over several. So (a) the
# U-Net's 2-D linear layers (the timestep embedding and each ResNet's projection
# of it), whose rows are all alike in a denoising step (one timestep for the
# whole batch), compute one row and broadcast it, which is also less work; rows
# that differ are zero-padded to FIXED_ROWS instead; and (b) the U-Net never runs
# on a batch of one: a lone unguided image is run twice. The decoder always runs
# on one image and the text encoder on one prompt, so they need neither.
FIXED_ROWS = 2 * MAX_BATCH  # guidance doubles the batch


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
    # "auto": the U-Net compiled ahead of time where its package is built (histolab.compiled_unet), else
    # ATen's kernels; "aten": ATen's kernels always (what a recipe made with them re-runs with).
    kernels: str = "auto"

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
        if self.kernels not in KERNELS:
            raise InvalidRequest(f"`kernels` must be one of {KERNELS} but is {self.kernels!r}")
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


def text_conditioning(model, request: GenerationRequest, n: int):
    """(cond, uncond) for ``n`` images: each prompt encoded once (batch of one) and
    repeated, so the embeddings are the same bits whatever ``n`` is, and a batch
    of 8 costs one text-encoder pass, not eight; a prompt seen before costs none
    (BaseModel.prompt_embedding)."""
    encode = getattr(model, "prompt_embedding", None) or (lambda p: model.encode_prompt([p]))
    cond = encode(request.prompt)
    uncond = encode(request.negative_prompt)
    return cond.expand(n, -1, -1), uncond.expand(n, -1, -1)


def generate(
    model,
    request: GenerationRequest,
    *,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | Callable[[], bool] | None = None,
    seeds: list[int] | None = None,
    on_latents: LatentsCallback | None = None,
) -> list[GeneratedImage]:
    """Generate ``request.batch_size`` images (or one per seed in ``seeds``)."""
    with model.lock:
        if request.adapters:
            # Applied for this request only and removed after, under the model's
            # lock: one user's adapters never reach another user's images.
            from histolab.adapters.runtime import applied

            ctx = applied(model, request.adapters)
        else:
            ctx = contextlib.nullcontext([])
        with ctx as used:
            return _generate_locked(model, request, used, progress, cancel, seeds, on_latents)


def _generate_locked(
    model, request, used: list[AdapterUse], progress, cancel, seeds, on_latents=None
) -> list[GeneratedImage]:
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

    # 3. Timesteps, from a fresh scheduler (schedulers keep per-run state). A model may bring its own
    # builder (the start-up worker's, histolab.startup_worker, which computes diffusers' samplers itself).
    make_scheduler = getattr(model, "make_scheduler", None) or build_scheduler
    scheduler = make_scheduler(req.scheduler, model.scheduler_config)
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
    # The sampler's arithmetic (latents, guidance, scheduler steps) stays float32
    # whatever the networks run in: a bfloat16 U-Net then differs from a float32
    # one by its own rounding only, not by a rounded trajectory (histolab.precision).
    latents = (latents * scheduler.init_noise_sigma).to(device=device)
    embeds = torch.cat([uncond, cond]) if do_cfg else cond.contiguous()
    embeds = embeds.to(dtype)

    # On CPU, images are the same bits whatever the batch (see FIXED_ROWS): a lone
    # unguided image runs as a batch of two, the timestep embedding row by row.
    # GPU kernels vary with the batch in more places than these two, so there it
    # is left to the kernels (and a compiled U-Net keeps its hook-free graph).
    exact = torch.device(device).type == "cpu" and not getattr(model, "optimizations", {}).get("compile")
    twice = do_cfg or (exact and n == 1)
    if twice and not do_cfg:
        embeds = torch.cat([embeds, embeds])
    fixed_rows = batch_invariant_time_embedding(model.unet) if exact else contextlib.nullcontext()
    traced = getattr(model, "traced_unet", None)
    if traced is not None and not traced.usable(model):
        traced = None  # adapters applied: the eager module sees their layers and hooks
    compiled = None
    if traced is not None and req.kernels == "auto" and getattr(model, "compiled_unets", None) is not None:
        rows = embeds.shape[0]
        compiled = model.compiled_unets.runner(model, (rows, *latents.shape[1:]), tuple(embeds.shape[1:]))
    if traced is not None:
        traced = traced.bind(model, tag=("fixed_rows", exact))  # the weights cannot change under the lock

    # 5. Denoising loop.
    with torch.inference_mode(), fixed_rows:
        for i, t in enumerate(timesteps):
            if is_cancelled(cancel):
                raise Cancelled(f"generation cancelled after {i} of {len(timesteps)} steps")
            x_in = torch.cat([latents, latents]) if twice else latents
            x_in = scheduler.scale_model_input(x_in, t).to(dtype)
            if compiled is not None:
                eps = compiled(x_in, t, embeds).float()
            elif traced is not None:
                eps = traced(x_in, t, embeds).float()
            else:
                eps = model.unet(x_in, t, encoder_hidden_states=embeds).sample.float()
            if do_cfg:
                eps_uncond, eps_cond = eps.chunk(2)
                eps = eps_uncond + req.guidance_scale * (eps_cond - eps_uncond)
            elif twice:
                eps = eps[:n]
            latents = scheduler.step(eps, t, latents, **step_kwargs).prev_sample
            if on_latents is not None:
                on_latents(i + 1, len(timesteps), latents)
            if progress is not None:
                progress(i + 1, len(timesteps))

        # 6. Decode, one image at a time: VAE decoding is the memory peak, and
        # per-image decoding keeps pixels independent of the batch size. The
        # pixels stay on the device until all are decoded: one copy to the host,
        # not a synchronising copy between decodes.
        pixels = [
            _to_uint8(model.vae.decode((latents[j : j + 1] / model.vae.config.scaling_factor).to(dtype)).sample)
            for j in range(n)
        ]
        images = [Image.fromarray(a) for a in torch.cat(pixels).cpu().numpy()]

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
            dtype=dtype_name(dtype),
            kernels=COMPILED_KIND if compiled is not None else "",
        )
        out.append(GeneratedImage(img, recipe))
    return out


@contextlib.contextmanager
def batch_invariant_time_embedding(unet):
    """Within the block, the U-Net's 2-D linear layers give the same bits whatever the batch (see FIXED_ROWS).

    Forward hooks (PyTorch's extension point) on the timestep-embedding linears,
    including adapter layers wrapped around them; removed on exit, so training
    and other users of the module are untouched. The model lock is held meanwhile.
    """
    import torch

    handles, batch_rows = [], {}

    def before(mod, args):
        x = args[0]
        if x.dim() != 2 or x.shape[0] == 1:
            return None
        if torch.equal(x, x[:1].expand_as(x)):  # a few hundred numbers: cheap, and CPU only
            batch_rows[id(mod)] = ("broadcast", x.shape[0])
            return (x[:1], *args[1:])
        if x.shape[0] >= FIXED_ROWS:
            return None
        batch_rows[id(mod)] = ("padded", x.shape[0])
        return (torch.cat([x, x.new_zeros(FIXED_ROWS - x.shape[0], x.shape[1])]), *args[1:])

    def after(mod, args, out):
        how, rows = batch_rows.pop(id(mod), (None, 0))
        if how == "broadcast":
            return out.expand(rows, *out.shape[1:])
        return out[:rows] if how == "padded" else None

    try:
        for name, mod in unet.named_modules():
            if isinstance(mod, torch.nn.Linear) and TIME_LINEAR.search(name):
                handles += [mod.register_forward_pre_hook(before), mod.register_forward_hook(after)]
        yield
    finally:
        for h in handles:
            h.remove()


def _to_uint8(x):
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, on x's device."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1)


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
        kernels=recipe_kernels(recipe),
    )


def recipe_kernels(recipe: Recipe) -> str:
    """The request's ``kernels`` that re-runs ``recipe``: ATen's for a recipe made with them; the compiled
    U-Net, where built, for one made with it."""
    return "auto" if recipe.kernels else "aten"
