"""The Generate tab: a base model and adapters with strengths, a prompt or a reference patch,
sampler settings, a gallery of PNGs that carry their recipes, real patches of the class beside
them, re-running a PNG's recipe, and big batches saved as a set in the background.

While it runs: step progress with an ETA, and (optionally) a live preview every few steps. The
form's checks and messages live in histolab.ui.formcheck (no Gradio there)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from histolab.data.prompts import CLASS_PROMPTS
from histolab.errors import InvalidRequest
from histolab.schedulers import SCHEDULER_NAMES
from histolab.ui.common import ACCELERATOR, OnLoad, new_session, to_float, to_int, ui_errors
from histolab.ui.formcheck import (
    NO_ADAPTER,
    RANDOM_SEED,
    Chosen,
    StepProgress,
    check_seed,
    count_tokens,
    insert_token,
    missing_trigger_warnings,
    reference_problem,
    reference_setup,
    ti_vectors,
    tokenizer_for,
)
from histolab.ui.uploads import image_upload

# One of the embedded default's own classes (histolab.data.prompts), so the first click makes what it knows.
DEFAULT_CLASS = "skin_he"
DEFAULT_PROMPT = CLASS_PROMPTS[DEFAULT_CLASS]
NO_CLASS = "(none)"
MODES = ("prompt", "reference patch")
PREVIEW_FRAMES = 8  # a live preview about this many times per run (SD-webui shows one every few steps)


@dataclass
class Form:
    """One generation form as the page sends it (adapters as (name, strength) pairs, one per slot)."""

    base: str
    mode: str
    prompt: str
    negative: str
    reference: Any  # upload path or None
    adapters: list[tuple[str, float]]
    steps: Any
    guidance: Any
    scheduler: str
    seed: Any
    batch: Any


@dataclass
class Prepared:
    """A checked request, with what the page should say before and after it runs."""

    source: str
    request: Any
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def projectors(services) -> list[tuple[str, str]]:
    """(name, path) of the usable projector (reference-mode) adapters in checkpoints/."""
    return [(a.label, a.path) for a in services.adapters() if a.kind == "projector" and a.usable]


def chosen_adapters(services, pairs: list[tuple[str, float]]) -> list[Chosen]:
    """The form's adapters with their slot numbers, kinds and trigger tokens (unknown names are left to
    make_request, which names them)."""
    listed = {a.label: a for a in services.adapters()}
    out = []
    for i, (name, strength) in enumerate(pairs, 1):
        a = listed.get(name)
        if a is None or name == NO_ADAPTER:
            continue
        try:
            strength = float(strength)
        except (TypeError, ValueError):
            strength = 1.0
        out.append(Chosen(i, a.label, a.kind, tuple(a.trigger.split()), strength))
    return out


def make_request(services, form: Form):
    """(base source, GenerationRequest), checked before any model is loaded. Raises InvalidRequest."""
    from histolab.generation import AdapterSpec, GenerationRequest

    s = services.settings
    if form.mode not in MODES:
        raise InvalidRequest(f"`mode` must be one of {list(MODES)} but is {form.mode!r}")
    source = services.resolve_base(form.base)
    steps = to_int("steps", form.steps, 1, s.max_steps)
    batch = to_int("batch size", form.batch, 1, s.max_batch)
    guidance = to_float("guidance", form.guidance, 0.0, 50.0)
    seed = check_seed(form.seed)
    specs = []
    for name, strength in form.adapters:
        if not name or name == NO_ADAPTER:
            continue
        specs.append(AdapterSpec(services.adapter_path(name), to_float(f"strength of {name}", strength, -4.0, 4.0)))
    if len(specs) > s.max_adapters:
        raise InvalidRequest(f"at most {s.max_adapters} adapters at once here, got {len(specs)}")
    reference = None
    if form.mode == "reference patch":
        reference = image_upload(
            form.reference, max_bytes=s.max_upload_bytes, max_side=s.max_upload_side, what="the reference patch"
        )
        problem = reference_problem([name for name, _ in form.adapters], projectors(services))
        if problem:
            raise InvalidRequest(problem)
    request = GenerationRequest(
        prompt=form.prompt or "",
        negative_prompt=form.negative or "",
        mode="reference" if reference is not None else "prompt",
        reference=reference,
        guidance_scale=guidance,
        steps=steps,
        scheduler=form.scheduler,
        seed=seed,
        batch_size=batch,
        adapters=tuple(specs),
    )
    request.validate()  # a bad value is reported before the model is loaded
    return source, request


def prepare(services, form: Form) -> Prepared:
    """The checked request and the warnings a run should show (gr.Warning and the status line)."""
    source, request = make_request(services, form)
    prep = Prepared(source, request)
    if request.mode == "prompt":
        prep.warnings += missing_trigger_warnings(form.prompt, form.negative, chosen_adapters(services, form.adapters))
    if str(form.seed).strip() in (str(RANDOM_SEED), f"{RANDOM_SEED}.0"):
        prep.notes.append(f"seed -1 drew {request.seed} (image i: {request.seed} + i)")
    return prep


def run(
    services, source: str, request, progress=None, cancel: threading.Event | None = None, on_latents=None, dtype=None
):
    """The engine's ``generate`` on the cached model for ``source`` (adapters applied for this request only);
    ``dtype``: that model in this dtype instead of the app's (Services.model)."""
    from histolab.generation import generate

    problem = services.base_problem(source)
    if problem:
        from histolab.errors import ModelNotFound

        raise ModelNotFound(problem)
    if dtype is None and on_latents is None and services.startup_serves(source):
        # Its model is still loading: the start-up worker makes the images, the same bits, when it can.
        with services.visitor_request():  # nested in on_generate's; for callers without it
            images = services.startup.generate(request, progress=progress, cancel=cancel)
        if images is not None:
            return images
    model = services.model(source, dtype)
    # On the app's network thread (histolab.torch_worker), which also sets torch's thread count for now:
    # half the cores while a training job runs (histolab.threads).
    return services.torch.call(generate, model, request, progress=progress, cancel=cancel, on_latents=on_latents)


def step_progress(progress, unit: str = "step"):
    """A ``gr.Progress`` (or any ``progress(fraction, desc=...)``) fed by the engine's step callback, with an ETA."""
    if progress is None:
        return None
    return StepProgress(lambda fraction, text: progress(fraction, desc=text), unit)


def produce(
    services,
    session: dict,
    prep: Prepared,
    real_class: str | None,
    progress=None,
    on_preview: Callable[[int, int, list], None] | None = None,
    cancel: threading.Event | None = None,
) -> dict[str, Any]:
    """Run a prepared request: gallery items, real patches (the reference first in reference mode),
    the recipes as SD-webui text, a zip of the PNGs, and the status line."""
    from histolab.recipe import png_bytes
    from histolab.ui.images import with_recipe, zip_pngs

    request = prep.request
    on_latents = None
    if on_preview is not None and not services.startup_serves(prep.source):  # no previews from the worker
        from histolab.preview import preview_images

        model = services.model(prep.source)
        every = max(1, request.steps // PREVIEW_FRAMES)

        def on_latents(done: int, total: int, latents) -> None:
            if done < total and done % every == 0:  # the last step's picture is the result itself
                on_preview(done, total, preview_images(model, latents))

    cancel = cancel or threading.Event()
    session["cancel"] = cancel  # this session's Cancel button sets it
    try:
        images = run(services, prep.source, request, step_progress(progress), cancel, on_latents)
    finally:
        session["cancel"] = None
    gallery = [(with_recipe(g.image, g.recipe), f"seed {g.recipe.seed}") for g in images]
    real = []
    if request.mode == "reference":
        real.append((request.reference, "reference patch"))
    if real_class and real_class != NO_CLASS:
        real += services.real_patches(real_class, len(images), seed=request.seed)
    archive = zip_pngs(
        [(f"{i:03d}-seed{g.recipe.seed}.png", png_bytes(g.image, g.recipe)) for i, g in enumerate(images)],
        f"histolab-seed{request.seed}.zip",
    )
    session["last"] = [g.recipe.to_dict() for g in images]
    return {
        "gallery": gallery,
        "real": real,
        "recipes": "\n\n".join(g.recipe.to_parameters() for g in images),
        "zip": archive,
        "warnings": list(prep.warnings),
        "status": "\n\n".join([*(f"⚠ {w}" for w in prep.warnings), *prep.notes]),
    }


def generate_images(services, session: dict, form: Form, real_class: str | None, progress=None) -> dict[str, Any]:
    """Plain handler: check the form, run it in this thread, return what the page shows."""
    return produce(services, session, prepare(services, form), real_class, progress)


def generate_stream(services, session: dict, prep: Prepared, real_class: str | None, progress=None, preview=False):
    """The same run in a worker thread, yielding ``{"preview": images, "text": ...}`` every few steps when
    ``preview`` is on and the final outputs last. Progress is reported from this (the caller's) thread, so
    ``gr.Progress`` sees it in its own request context. Leaving early (the page closed) cancels the run."""
    events: queue.Queue = queue.Queue()
    cancel = threading.Event()  # made here, so leaving before the worker has started still cancels it

    def report(fraction: float, desc: str = "") -> None:
        events.put(("progress", fraction, desc))

    def on_preview(done: int, total: int, images: list) -> None:
        events.put(("preview", done, total, images))

    def work() -> None:
        try:
            out = produce(services, session, prep, real_class, report, on_preview if preview else None, cancel)
            events.put(("done", out))
        except BaseException as exc:  # handed to the caller's thread, which raises it
            events.put(("error", exc))

    worker = threading.Thread(target=work, name="histolab-generate", daemon=True)
    worker.start()
    finished = False
    try:
        while True:
            kind, *rest = events.get()
            if kind == "progress":
                if progress is not None:
                    progress(rest[0], desc=rest[1])
            elif kind == "preview":
                done, total, images = rest
                yield {"preview": [(im, f"preview: step {done} of {total}") for im in images]}
            elif kind == "error":
                finished = True
                raise rest[0]
            else:
                finished = True
                yield rest[0]
                return
    finally:
        if not finished:
            cancel.set()


def cancel_generation(session: dict) -> str:
    ev = session.get("cancel")
    if ev is None:
        return "nothing is running in this session"
    ev.set()
    return "cancelling at the next step"


# ------------------------------------------------------------------ the prompt's helpers


def token_counter(services, base_label: str, prompt: str, adapter_names: list[str]) -> str:
    """'n/75 tokens' for the base's tokenizer, with the chosen textual inversions' tokens counted as the
    engine expands them; a warning naming the cut words past CLIP's limit."""
    try:
        source = services.resolve_base(base_label)
    except InvalidRequest:
        return ""
    vectors: dict[str, int] = {}
    listed = {a.label: a for a in services.adapters()}
    for name in adapter_names:
        a = listed.get(name)
        if a is not None and a.kind == "textual_inversion" and a.usable:
            vectors.update(ti_vectors(a.path))
    return count_tokens(tokenizer_for(source), prompt, vectors).text()


def trigger_samples(services, adapter_names: list[str]) -> list[list[str]]:
    """The chosen adapters' trigger tokens, one sample each (the clickable list under the adapters)."""
    listed = {a.label: a for a in services.adapters()}
    seen, out = set(), []
    for name in adapter_names:
        a = listed.get(name)
        for tok in a.trigger.split() if a is not None else []:
            if tok not in seen:
                seen.add(tok)
                out.append([tok])
    return out


def trigger_info(services, name: str) -> str:
    """The adapter slot's info line: its trigger tokens, where it is chosen."""
    a = next((a for a in services.adapters() if a.label == name), None)
    if a is None or not a.trigger:
        return ""
    what = "textual inversion tokens" if a.kind == "textual_inversion" else "trigger token"
    return f"{what}: {a.trigger} (click one below to add it to the prompt)"


def class_prompt(real_class: str) -> str:
    """The prompt of a bundled class (its first caption template); an error for no class."""
    if real_class not in CLASS_PROMPTS:
        raise InvalidRequest(f"choose a class under 'Real patches of class' first (one of {sorted(CLASS_PROMPTS)})")
    return CLASS_PROMPTS[real_class]


# ------------------------------------------------------------------ recipes


def recipe_from_upload(services, path):
    from histolab.recipe import read_recipe
    from histolab.ui.uploads import png_upload

    s = services.settings
    data = png_upload(path, max_bytes=s.max_upload_bytes, max_side=s.max_upload_side, what="the PNG")
    return read_recipe(data)


def adapters_of_recipe(services, recipe) -> list[tuple[str, float]]:
    """The recipe's adapters as names in this app's list (by their path in checkpoints/, else by name)."""
    from pathlib import Path

    listed = services.adapters()
    root = services.paths.checkpoints.resolve()
    out = []
    for a in recipe.adapters:
        match = None
        for c in listed:
            p = Path(c.path).resolve()
            rel = p.relative_to(root).as_posix() if root in p.parents else str(p)
            if a.path and a.path in (rel, str(p)):
                match = c
                break
        match = match or next((c for c in listed if c.label == a.name), None)
        if match is None:
            raise InvalidRequest(
                f"the recipe uses adapter {a.name!r} ({a.path or 'no path'}), which is not in checkpoints/ here"
            )
        out.append((match.label, a.strength))
    return out


def base_of_recipe(services, recipe) -> str:
    for label, src in services.base_choices():
        if recipe.base_model in (label, src):
            return label
    return services.base_choices()[0][0]


def recipe_dtype(recipe, notes: list[str]) -> str | None:
    """The dtype a re-run loads the base in: the recipe's, so that its pixels come back exactly (the
    CLI's ``--from-png`` does the same); None (the app's own) for recipes from before the field."""
    from histolab.precision import DTYPE_NAMES

    if not recipe.dtype:
        return None
    if recipe.dtype not in DTYPE_NAMES or recipe.dtype == "auto":
        notes.append(f"the recipe's dtype {recipe.dtype!r} is unknown here; made in the app's dtype")
        return None
    return recipe.dtype


def rerun_recipe(services, session: dict, path, reference_path, progress=None) -> dict[str, Any]:
    """Make the PNG's image again from its recipe: same base, adapters, sampler and seed."""
    recipe = recipe_from_upload(services, path)
    notes = []
    base_label = base_of_recipe(services, recipe)
    form = Form(
        base=base_label,
        mode="reference patch" if recipe.mode == "reference" else "prompt",
        prompt=recipe.prompt,
        negative=recipe.negative_prompt,
        reference=reference_path,
        adapters=adapters_of_recipe(services, recipe),
        steps=recipe.steps,
        guidance=recipe.guidance_scale,
        scheduler=recipe.scheduler,
        seed=recipe.seed,
        batch=1,
    )
    if recipe.mode == "reference" and not reference_path:
        raise InvalidRequest(
            f"this recipe was made from a reference patch (hash {recipe.reference_hash[:10]}); upload that patch too"
        )
    source, request = make_request(services, form)
    from histolab.generation import recipe_kernels

    request = replace(request, width=recipe.width, height=recipe.height, kernels=recipe_kernels(recipe))
    dtype = recipe_dtype(recipe, notes)
    images = run(services, source, request, step_progress(progress), dtype=dtype)
    g = images[0]
    if dtype and g.recipe.dtype != dtype:
        notes.append(f"made in {g.recipe.dtype}, the recipe in {dtype}, so the pixels differ by rounding")
    if g.recipe.kernels != recipe.kernels:
        notes.append(
            f"made with {g.recipe.kernels or 'ATen'} kernels, the recipe with {recipe.kernels or 'ATen'} kernels "
            "(the compiled U-Net for this shape is not built here), so the pixels differ by rounding"
        )
    if g.recipe.base_hash != recipe.base_hash:
        notes.append(
            f"the recipe's base {recipe.base_model!r} ({recipe.base_hash[:10]}) is not here; made with "
            f"{base_label!r} ({g.recipe.base_hash[:10]}), so the pixels differ"
        )
    for used, old in zip(g.recipe.adapters, recipe.adapters, strict=False):
        if used.hash != old.hash:
            notes.append(f"adapter {used.name!r} has changed since (hash), so the pixels will differ")
    if recipe.mode == "reference" and g.recipe.reference_hash != recipe.reference_hash:
        notes.append("the uploaded reference patch is not the recipe's (hash), so the pixels will differ")
    from histolab.ui.images import with_recipe

    return {
        "gallery": [(with_recipe(g.image, g.recipe), f"seed {g.recipe.seed} (re-run)")],
        "recipes": g.recipe.to_parameters(),
        "note": "; ".join(notes) or "same base, adapters and settings as the recipe",
    }


# ------------------------------------------------------------------ background sets


def start_set(services, session: dict, form: Form, name: str, n, per_class: bool) -> str:
    """A big batch as a background task: ``outputs/sets/NAME`` (one subfolder per class when ``per_class``)."""
    from histolab.review.config import SLUG

    admin = services.auth.require_admin(session)
    name = str(name or "").strip()
    if not SLUG.match(name):
        raise InvalidRequest(f"set name must be a short lowercase name (letters, digits, '_', '-') but is {name!r}")
    n = to_int("images", n, 1, services.settings.max_set_images)
    if form.mode != "prompt":
        raise InvalidRequest("background sets are made from prompts; reference mode is for single patches")
    # The form's batch is the background run's batch too (at most the app's max_batch, checked there).
    source, request = make_request(services, form)
    prompts = dict(CLASS_PROMPTS) if per_class else {"": request.prompt}
    params = {
        "name": name,
        "base": source,
        "n": n,
        "prompts": prompts,
        "request": {
            "negative_prompt": request.negative_prompt,
            "guidance_scale": request.guidance_scale,
            "steps": request.steps,
            "scheduler": request.scheduler,
            "seed": request.seed,
            "batch_size": request.batch_size,
            "adapters": [[a.ref, a.strength] for a in request.adapters],
        },
        "resume": (services.sets_root / name).exists(),
    }
    info = services.tasks.submit("generate-set", params, title=f"set {name}: {n} images", owner=admin.name)
    return info.id


def run_set_task(services):
    """The task function behind ``start_set`` (registered with the task runner)."""

    def task(params: dict, ctx) -> dict:
        from histolab.batch import generate_to_dir
        from histolab.generation import AdapterSpec, GenerationRequest

        req = params["request"]
        base = GenerationRequest(
            negative_prompt=req["negative_prompt"],
            guidance_scale=req["guidance_scale"],
            steps=req["steps"],
            scheduler=req["scheduler"],
            seed=req["seed"],
            batch_size=req["batch_size"],
            adapters=tuple(AdapterSpec(r, s) for r, s in req["adapters"]),
        )
        model = services.model(params["base"])
        out_root = services.sets_root / params["name"]
        prompts = params["prompts"]
        total = params["n"] * len(prompts)
        done = 0
        for k, (cls, prompt) in enumerate(prompts.items()):
            folder = out_root / cls if cls else out_root
            request = replace(base, prompt=prompt, seed=base.seed + 100_000 * k)

            def progress(d: int, n: int, done_before=done, cls=cls) -> None:
                ctx.progress((done_before + d) / total, f"{cls or 'images'}: {d} of {n}")

            resume = params.get("resume", False) and (folder / "run.json").exists()
            generate_to_dir(model, request, params["n"], folder, resume=resume, progress=progress, cancel=ctx.cancel)
            done += params["n"]
        return {"folder": str(out_root), "images": total}

    return task


# ------------------------------------------------------------------ the page


def adapter_table(services) -> list[list[str]]:
    return [
        [a.label, a.kind, a.base or "?", a.trigger, "yes" if a.usable else f"no: {a.why}"] for a in services.adapters()
    ]


# Run once per page (builder.py loads it): two things the SD-webui user expects of the page itself.
# 1. Ctrl+Enter (Cmd+Enter on a Mac) in either prompt box clicks Generate.
# 2. A slider's number box: Gradio's front end clamps a typed value to the slider's range when the box loses
#    the focus, silently. The capture-phase listener sees the typed value first and says what is used instead.
PAGE_JS = """
() => {
  if (window.__histolabPage) return [];
  window.__histolabPage = true;
  document.addEventListener("keydown", (e) => {
    if (e.key !== "Enter" || !(e.ctrlKey || e.metaKey)) return;
    const box = e.target && e.target.closest ? e.target.closest("#prompt, #negative-prompt") : null;
    if (!box) return;
    e.preventDefault();
    const go = document.querySelector("#generate-button");
    if (go && !go.disabled) go.click();
  }, true);
  window.__histolabCtrlEnter = true;
  document.addEventListener("blur", (e) => {
    const box = e.target;
    if (!(box instanceof HTMLInputElement) || box.type !== "number") return;
    const block = box.closest(".block");
    const range = block ? block.querySelector("input[type=range]") : null;
    if (!range) return;
    const v = parseFloat(box.value), lo = parseFloat(range.min), hi = parseFloat(range.max);
    let note = block.querySelector(".histolab-clamp-note");
    if (Number.isNaN(v) || (v >= lo && v <= hi)) {
      if (note) note.remove();
      return;
    }
    if (!note) {
      note = document.createElement("div");
      note.className = "histolab-clamp-note";
      note.setAttribute("role", "status");
      note.style.cssText = "color:#b45309;font-size:12px;margin-top:4px";
      block.appendChild(note);
    }
    const label = (block.querySelector("label") || {}).textContent || "value";
    const used = v > hi ? hi : lo;
    const bound = v > hi ? `above the maximum ${hi}` : `below the minimum ${lo}`;
    note.textContent = `${label.trim()}: ${box.value} is ${bound}, so ${used} is used.`;
  }, true);
  return [];
}
"""
# A run that succeeds closes the error toasts of the runs before it: the problem they named is solved.
CLEAR_ERRORS_JS = """
() => {
  document.querySelectorAll(".toast-body.error .toast-close").forEach((b) => b.click());
  return [];
}
"""


def build(services, session_state):
    """The tab's components and events, inside the caller's ``gr.Blocks`` and ``gr.Tab``.

    Returns (function, outputs) to run when a page loads (the lists read from disk then); its ``parts``
    name the form's components for the Compare tab's "Send to Compare".
    """
    import gradio as gr

    from histolab.ui.spaces import gpu

    s = services.settings
    n_ad = s.max_adapters
    base_labels = [label for label, _ in services.base_choices()]
    banner = services.base_problem()
    problem = gr.Markdown(f"**{banner}**" if banner else "", visible=bool(banner), elem_id="base-problem")
    with gr.Row():
        with gr.Column(scale=2):
            with gr.Row():
                base = gr.Dropdown(base_labels, value=base_labels[0], label="Base model")
                mode = gr.Radio(list(MODES), value="prompt", label="Condition on", elem_id="generate-mode")
            with gr.Row(equal_height=False):
                with gr.Column(scale=5, min_width=240):
                    prompt = gr.Textbox(
                        label="Prompt (Ctrl+Enter generates)", value=DEFAULT_PROMPT, lines=2, elem_id="prompt"
                    )
                    tokens = gr.Markdown("", elem_id="prompt-tokens", elem_classes=["histolab-small"])
                with gr.Column(scale=1, min_width=130):
                    go = gr.Button("Generate", variant="primary", elem_id="generate-button")
                    stop = gr.Button("Cancel", variant="stop", elem_id="generate-cancel")
                    send = gr.Button("Send to Compare", size="sm", elem_id="send-to-compare")
            negative = gr.Textbox(label="Negative prompt", value="", lines=1, elem_id="negative-prompt")
            mode_note = gr.Markdown("", elem_id="mode-note")
            with gr.Row(visible=False) as reference_row:
                # A file, not an image input: Gradio would decode an image input before our content checks.
                reference = gr.File(
                    label="Reference patch (PNG/JPEG/TIFF/BMP/WebP)", type="filepath", height=120, elem_id="reference"
                )
                reference_preview = gr.Image(label="As read", type="pil", interactive=False, height=120)
            with gr.Accordion("Adapters from checkpoints/", open=True):
                slots = []
                for i in range(n_ad):
                    with gr.Row():
                        name = gr.Dropdown(
                            [NO_ADAPTER],
                            value=NO_ADAPTER,
                            label=f"Adapter {i + 1}",
                            scale=3,
                            allow_custom_value=True,
                            elem_id=f"adapter-{i + 1}",
                        )
                        strength = gr.Slider(-2.0, 2.0, value=1.0, step=0.05, label="Strength", scale=2)
                    slots.append((name, strength))
                triggers = gr.Dataset(
                    components=[gr.Textbox(visible=False)],
                    samples=[],
                    label="Trigger tokens of the chosen adapters: click one to add it to the prompt",
                    elem_id="trigger-tokens",
                    visible=False,  # shown when a chosen adapter has trigger tokens
                )
                refresh = gr.Button("Refresh the list", size="sm")
                table = gr.Dataframe(
                    headers=["name", "kind", "made for", "trigger", "usable"], interactive=False, wrap=True
                )
            with gr.Row():
                # The controls bound every number (Gradio refuses a value outside them, naming it and the bound).
                steps = gr.Slider(
                    1, s.max_steps, value=min(25, s.max_steps), step=1, label="Steps", elem_id="generate-steps"
                )
                guidance = gr.Slider(0.0, 20.0, value=7.5, step=0.1, label="Guidance", elem_id="generate-guidance")
            with gr.Row():
                scheduler = gr.Dropdown(list(SCHEDULER_NAMES), value="dpmpp_2m_karras", label="Sampler")
                # No maximum here: a seed beyond 2^32-1 gets our message (naming the value and the range).
                seed = gr.Number(
                    value=0, precision=0, label="Seed (image i: seed + i; -1: random)", elem_id="generate-seed"
                )
                batch = gr.Slider(
                    1, s.max_batch, value=min(4, s.max_batch), step=1, label="Images", elem_id="generate-batch"
                )
            live = gr.Checkbox(value=False, label="Live preview every few steps", elem_id="live-preview")
            with gr.Row():
                real_class = gr.Dropdown(
                    [NO_CLASS, *services.class_labels()],
                    value=NO_CLASS,
                    label="Real patches of class (shown beside)",
                    elem_id="real-class",
                    scale=3,
                )
                use_class = gr.Button("Use this class's prompt", size="sm", elem_id="use-class-prompt", scale=1)
        with gr.Column(scale=3):
            gallery = gr.Gallery(
                label="Generated (each PNG carries its recipe)",
                format="png",
                columns=4,
                buttons=["download", "fullscreen"],
                elem_id="generated-gallery",
            )
            real = gr.Gallery(
                label="Beside: the reference patch, real patches of the class (bundled test split)",
                columns=4,
                format="png",
                elem_id="beside-gallery",
            )
            recipes = gr.Textbox(label="Recipes", lines=4, interactive=False)
            archive = gr.File(label="All PNGs with their recipes (zip)", interactive=False)
            status = gr.Markdown("", elem_id="generate-status")
    with gr.Accordion("Re-run from a PNG's recipe", open=False):
        with gr.Row():
            recipe_png = gr.File(label="A PNG made here (or by SD-webui)", file_types=[".png"], type="filepath")
            recipe_ref = gr.File(label="Its reference patch (reference-mode recipes only)", type="filepath")
        with gr.Row():
            load = gr.Button("Load the recipe into the form")
            rerun = gr.Button("Re-run it exactly")
        rerun_note = gr.Markdown("")
    with gr.Accordion("Save a big batch as a set (background, admin)", open=False):
        with gr.Row():
            set_name = gr.Textbox(label="Set name (outputs/sets/NAME)", value="my-set")
            set_n = gr.Number(value=50, precision=0, minimum=1, label="Images (per class)")
            set_per_class = gr.Checkbox(value=True, label="One subfolder per bundled class (its prompt)")
        set_go = gr.Button("Start in the background")
        set_status = gr.Markdown("")

    adapter_inputs = [x for pair in slots for x in pair]
    names = [n for n, _ in slots]
    form_inputs = [base, mode, prompt, negative, reference, *adapter_inputs, steps, guidance, scheduler, seed, batch]

    def form_of(values: list) -> Form:
        b, m, p, neg, ref = values[:5]
        ad = values[5 : 5 + 2 * n_ad]
        st, gd, sc, sd, bt = values[5 + 2 * n_ad :]
        pairs = [(ad[2 * i], ad[2 * i + 1]) for i in range(n_ad)]
        return Form(b, m, p, neg, ref, pairs, st, gd, sc, sd, bt)

    @ui_errors
    def on_generate(session, *values, progress=gr.Progress()):  # noqa: B008  (Gradio injects progress this way)
        session = session if isinstance(session, dict) else new_session()
        *form_values, cls, preview = values
        prep = prepare(services, form_of(list(form_values)))
        for w in prep.warnings:
            gr.Warning(w)
        with services.visitor_request():  # until Gradio has taken the last result (the preload waits for it)
            for out in generate_stream(services, session, prep, cls, progress, bool(preview)):
                if "preview" in out:
                    yield out["preview"], gr.skip(), gr.skip(), gr.skip(), gr.skip()
                else:
                    yield out["gallery"], out["real"], out["recipes"], out["zip"], out["status"]

    # The preview checkbox comes last, so API callers that send the form as before get its default.
    go.click(
        gpu(on_generate),
        inputs=[session_state, *form_inputs, real_class, live],
        outputs=[gallery, real, recipes, archive, status],
        api_name="generate",
        concurrency_id=ACCELERATOR,
        concurrency_limit=1,
        show_progress_on=[recipes],  # the bar sits on the recipes box; the gallery stays free for the preview
    ).success(None, js=CLEAR_ERRORS_JS, api_visibility="private", queue=False)

    @ui_errors
    def on_cancel(session):
        return cancel_generation(session if isinstance(session, dict) else new_session())

    stop.click(on_cancel, inputs=[session_state], outputs=[status], api_name="cancel_generation", queue=False)

    # ---- the prompt's token counter and the adapters' trigger tokens
    def on_tokens(b, p, *chosen):
        return token_counter(services, b, p, list(chosen))

    counter_inputs = [base, prompt, *names]
    for trigger in (prompt.change, base.change):
        trigger(ui_errors(on_tokens), counter_inputs, [tokens], api_visibility="private", queue=False)

    def on_slot(name, *chosen):
        samples = trigger_samples(services, list(chosen))
        return gr.update(info=trigger_info(services, name)), gr.Dataset(samples=samples, visible=bool(samples))

    for name in names:
        name.change(ui_errors(on_slot), [name, *names], [name, triggers], api_visibility="private", queue=False).then(
            ui_errors(on_tokens), counter_inputs, [tokens], api_visibility="private", queue=False
        )

    def on_trigger(sample, p):
        token = sample[0] if isinstance(sample, list | tuple) and sample else str(sample or "")
        return insert_token(p, token)

    triggers.click(on_trigger, [triggers, prompt], [prompt], api_visibility="private", queue=False)

    def on_refresh():
        choices = [NO_ADAPTER, *[a.label for a in services.adapters(refresh=True) if a.usable]]
        return (*[gr.update(choices=choices) for _ in range(n_ad)], adapter_table(services))

    list_event = refresh.click(ui_errors(on_refresh), outputs=[*names, table], api_name="list_adapters")
    del list_event

    # ---- reference mode: the only projector chosen, its recommended settings, the prompt boxes greyed out
    def on_mode(m, *chosen):
        prompt_mode = m != "reference patch"
        if prompt_mode:
            kept = [f"{n} (Adapter {i})" for i, n in enumerate(chosen, 1) if n in {p for p, _ in projectors(services)}]
            note = (
                f"Prompt mode: {', '.join(kept)} stays chosen and applies its attention layers to the prompt; set "
                "it to (none) to generate from the prompt alone."
                if kept
                else ""
            )
            return (
                gr.update(visible=False),
                gr.update(interactive=True),
                gr.update(interactive=True),
                *[gr.update() for _ in range(n_ad)],
                gr.update(),
                gr.update(),
                gr.update(),
                note,
            )
        from histolab.adapters.recommended import recommended_settings

        setup = reference_setup(list(chosen), projectors(services), s.max_steps, recommended_settings)
        got = setup.settings
        return (
            gr.update(visible=True),
            gr.update(interactive=False),
            gr.update(interactive=False),
            *[gr.update(value=v) if v != old else gr.update() for v, old in zip(setup.slots, chosen, strict=True)],
            gr.update(value=got["steps"]) if "steps" in got else gr.update(),
            gr.update(value=got["guidance"]) if "guidance" in got else gr.update(),
            gr.update(value=got["scheduler"]) if "scheduler" in got else gr.update(),
            f"**Reference mode.** {setup.note}",
        )

    mode.change(
        ui_errors(on_mode),
        inputs=[mode, *names],
        outputs=[reference_row, prompt, negative, *names, steps, guidance, scheduler, mode_note],
        api_visibility="private",
        queue=False,
    )

    @ui_errors
    def on_reference(path):
        if not path:
            return None
        return image_upload(path, max_bytes=s.max_upload_bytes, max_side=s.max_upload_side, what="the reference patch")

    reference.change(on_reference, inputs=[reference], outputs=[reference_preview], api_visibility="private")

    # ---- the real class beside: never touches the prompt; its prompt is a button of its own
    use_class.click(ui_errors(class_prompt), [real_class], [prompt], api_visibility="private", queue=False)

    @ui_errors
    def on_load_recipe(path):
        r = recipe_from_upload(services, path)
        adapters = adapters_of_recipe(services, r)
        ad_updates = []
        for i in range(n_ad):
            if i < len(adapters):
                ad_updates += [gr.update(value=adapters[i][0]), gr.update(value=adapters[i][1])]
            else:
                ad_updates += [gr.update(value=NO_ADAPTER), gr.update(value=1.0)]
        return (
            gr.update(value=base_of_recipe(services, r)),
            gr.update(value="reference patch" if r.mode == "reference" else "prompt"),
            r.prompt,
            r.negative_prompt,
            *ad_updates,
            r.steps,
            r.guidance_scale,
            r.scheduler,
            r.seed,
            1,
            f"loaded: seed {r.seed}, {r.steps} steps, {r.scheduler}, guidance {r.guidance_scale:g}",
        )

    load.click(
        on_load_recipe,
        inputs=[recipe_png],
        outputs=[base, mode, prompt, negative, *adapter_inputs, steps, guidance, scheduler, seed, batch, rerun_note],
        api_name="read_recipe",
    )

    @ui_errors
    def on_rerun(session, path, ref, progress=gr.Progress()):  # noqa: B008
        out = rerun_recipe(services, session if isinstance(session, dict) else new_session(), path, ref, progress)
        return out["gallery"], out["recipes"], out["note"]

    rerun.click(
        gpu(on_rerun),
        inputs=[session_state, recipe_png, recipe_ref],
        outputs=[gallery, recipes, rerun_note],
        api_name="rerun_recipe",
        concurrency_id=ACCELERATOR,
        concurrency_limit=1,
    )

    @ui_errors
    def on_set(session, *values):
        *form_values, name, n, per_class = values
        task_id = start_set(
            services, session if isinstance(session, dict) else new_session(), form_of(form_values), name, n, per_class
        )
        return f"started task {task_id}; it goes on if you close the page (see the Tasks list on the Evaluate tab)"

    set_go.click(
        on_set,
        inputs=[session_state, *form_inputs, set_name, set_n, set_per_class],
        outputs=[set_status],
        api_name="generate_set",
    )

    def on_page_load(b, p, *chosen):
        choices = [NO_ADAPTER, *[a.label for a in services.adapters() if a.usable]]
        banner = services.base_problem()
        return (
            *[gr.update(choices=choices) for _ in range(n_ad)],
            adapter_table(services),
            gr.update(value=f"**{banner}**" if banner else "", visible=bool(banner)),
            token_counter(services, b, p, list(chosen)),
        )

    hook = OnLoad(on_page_load, counter_inputs, [*names, table, problem, tokens])
    # For "Send to Compare" (histolab.ui.compare.receive): the form as the Generate tab holds it.
    hook.parts = {"form": form_inputs, "send": send, "n_adapters": n_ad}
    return hook
