"""The Generate tab: a base model and adapters with strengths, a prompt or a reference patch,
sampler settings, a gallery of PNGs that carry their recipes, real patches of the class beside
them, re-running a PNG's recipe, and big batches saved as a set in the background."""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass, replace
from typing import Any

from histolab.errors import InvalidRequest
from histolab.schedulers import SCHEDULER_NAMES
from histolab.ui.common import ACCELERATOR, OnLoad, new_session, progress_fn, to_float, to_int, ui_errors
from histolab.ui.uploads import image_upload

DEFAULT_PROMPT = "an h&e stained histology image of colon tissue"
NO_ADAPTER = "(none)"
NO_CLASS = "(none)"
MODES = ("prompt", "reference patch")
RANDOM_SEED = -1  # SD-webui's convention: -1 draws a seed


@dataclass
class Form:
    """One generation form as the page sends it (adapters as (name, strength) pairs)."""

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
    seed = to_int("seed", form.seed, RANDOM_SEED)
    if seed == RANDOM_SEED:
        seed = secrets.randbelow(2**32)
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


def run(services, source: str, request, progress=None, cancel: threading.Event | None = None, dtype=None):
    """The engine's ``generate`` on the cached model for ``source`` (adapters applied for this request only);
    ``dtype``: that model in this dtype instead of the app's (Services.model)."""
    from histolab.generation import generate

    problem = services.base_problem(source)
    if problem:
        from histolab.errors import ModelNotFound

        raise ModelNotFound(problem)
    model = services.model(source, dtype)
    return generate(model, request, progress=progress, cancel=cancel)


def generate_images(services, session: dict, form: Form, real_class: str | None, progress=None) -> dict[str, Any]:
    """Plain handler: gallery items, real patches, the recipes as SD-webui text, a zip of the PNGs."""
    from histolab.ui.images import with_recipe, zip_pngs

    source, request = make_request(services, form)
    cancel = threading.Event()
    session["cancel"] = cancel  # this session's Cancel button sets it
    try:
        images = run(services, source, request, progress_fn(progress), cancel)
    finally:
        session["cancel"] = None
    gallery = [(with_recipe(g.image, g.recipe), f"seed {g.recipe.seed}") for g in images]
    real = []
    if real_class and real_class != NO_CLASS:
        real = services.real_patches(real_class, len(images), seed=request.seed)
    from histolab.recipe import png_bytes

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
    }


def cancel_generation(session: dict) -> str:
    ev = session.get("cancel")
    if ev is None:
        return "nothing is running in this session"
    ev.set()
    return "cancelling at the next step"


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
    request = replace(request, width=recipe.width, height=recipe.height)
    dtype = recipe_dtype(recipe, notes)
    images = run(services, source, request, progress_fn(progress), dtype=dtype)
    g = images[0]
    if dtype and g.recipe.dtype != dtype:
        notes.append(f"made in {g.recipe.dtype}, the recipe in {dtype}, so the pixels differ by rounding")
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
    source, request = make_request(services, replace(form, batch=min(to_int("batch", form.batch, 1), 8)))
    from histolab.data.prompts import CLASS_PROMPTS

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


def build(services, session_state):
    """The tab's components and events, inside the caller's ``gr.Blocks`` and ``gr.Tab``.

    Returns (function, outputs) to run when a page loads (the lists read from disk then).
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
                mode = gr.Radio(list(MODES), value="prompt", label="Condition on")
            prompt = gr.Textbox(label="Prompt", value=DEFAULT_PROMPT, lines=2)
            negative = gr.Textbox(label="Negative prompt", value="", lines=1)
            with gr.Row(visible=False) as reference_row:
                # A file, not an image input: Gradio would decode an image input before our content checks.
                reference = gr.File(label="Reference patch (PNG/JPEG/TIFF/BMP/WebP)", type="filepath", height=120)
                reference_preview = gr.Image(label="As read", type="pil", interactive=False, height=120)
            with gr.Accordion("Adapters from checkpoints/", open=True):
                slots = []
                for i in range(n_ad):
                    with gr.Row():
                        name = gr.Dropdown(
                            [NO_ADAPTER], value=NO_ADAPTER, label=f"Adapter {i + 1}", scale=3, allow_custom_value=True
                        )
                        strength = gr.Slider(-2.0, 2.0, value=1.0, step=0.05, label="Strength", scale=2)
                    slots.append((name, strength))
                refresh = gr.Button("Refresh the list", size="sm")
                table = gr.Dataframe(
                    headers=["name", "kind", "made for", "trigger", "usable"], interactive=False, wrap=True
                )
            with gr.Row():
                steps = gr.Slider(1, s.max_steps, value=min(25, s.max_steps), step=1, label="Steps")
                guidance = gr.Slider(0.0, 20.0, value=7.5, step=0.1, label="Guidance")
            with gr.Row():
                scheduler = gr.Dropdown(list(SCHEDULER_NAMES), value="dpmpp_2m_karras", label="Sampler")
                seed = gr.Number(value=0, precision=0, minimum=-1, label="Seed (image i: seed + i; -1: random)")
                batch = gr.Slider(1, s.max_batch, value=min(4, s.max_batch), step=1, label="Images")
            real_class = gr.Dropdown(
                [NO_CLASS, *services.class_labels()], value=NO_CLASS, label="Real patches of class (shown beside)"
            )
            with gr.Row():
                go = gr.Button("Generate", variant="primary", elem_id="generate-button")
                stop = gr.Button("Cancel", variant="stop")
        with gr.Column(scale=3):
            gallery = gr.Gallery(
                label="Generated (each PNG carries its recipe)",
                format="png",
                columns=4,
                buttons=["download", "fullscreen"],
                elem_id="generated-gallery",
            )
            real = gr.Gallery(label="Real patches of the class (bundled test split)", columns=4, format="png")
            recipes = gr.Textbox(label="Recipes", lines=4, interactive=False)
            archive = gr.File(label="All PNGs with their recipes (zip)", interactive=False)
            status = gr.Markdown("")
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
        *form_values, cls = values
        out = generate_images(services, session, form_of(list(form_values)), cls, progress)
        return out["gallery"], out["real"], out["recipes"], out["zip"], ""

    go.click(
        gpu(on_generate),
        inputs=[session_state, *form_inputs, real_class],
        outputs=[gallery, real, recipes, archive, status],
        api_name="generate",
        concurrency_id=ACCELERATOR,
        concurrency_limit=1,
    )

    @ui_errors
    def on_cancel(session):
        return cancel_generation(session if isinstance(session, dict) else new_session())

    stop.click(on_cancel, inputs=[session_state], outputs=[status], api_name="cancel_generation", queue=False)

    def on_refresh():
        choices = [NO_ADAPTER, *[a.label for a in services.adapters(refresh=True) if a.usable]]
        return (*[gr.update(choices=choices) for _ in range(n_ad)], adapter_table(services))

    list_event = refresh.click(ui_errors(on_refresh), outputs=[*[n for n, _ in slots], table], api_name="list_adapters")
    del list_event

    def on_mode(m):
        return gr.update(visible=m == "reference patch")

    mode.change(on_mode, inputs=[mode], outputs=[reference_row], api_visibility="private", queue=False)

    @ui_errors
    def on_reference(path):
        if not path:
            return None
        return image_upload(path, max_bytes=s.max_upload_bytes, max_side=s.max_upload_side, what="the reference patch")

    reference.change(on_reference, inputs=[reference], outputs=[reference_preview], api_visibility="private")

    def on_class(cls, m):
        from histolab.data.prompts import CLASS_PROMPTS

        if m == "prompt" and cls in CLASS_PROMPTS:
            return gr.update(value=CLASS_PROMPTS[cls])
        return gr.update()

    real_class.change(on_class, inputs=[real_class, mode], outputs=[prompt], api_visibility="private", queue=False)

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

    def on_page_load():
        choices = [NO_ADAPTER, *[a.label for a in services.adapters() if a.usable]]
        banner = services.base_problem()
        return (
            *[gr.update(choices=choices) for _ in range(n_ad)],
            adapter_table(services),
            gr.update(value=f"**{banner}**" if banner else "", visible=bool(banner)),
        )

    return OnLoad(on_page_load, [], [*[n for n, _ in slots], table, problem])
