"""The Compare tab: the same seeds across the base, each adapter and real patches in one grid,
and an X/Y plot of one parameter against another (SD-webui's X/Y plot)."""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any

from histolab.errors import InvalidRequest
from histolab.schedulers import SCHEDULER_NAMES
from histolab.ui.common import ACCELERATOR, OnLoad, new_session, to_int, ui_errors
from histolab.ui.formcheck import RANDOM_SEED, SEED_MAX, check_seed
from histolab.ui.generate import DEFAULT_PROMPT, NO_ADAPTER, NO_CLASS, Form, make_request, run

AXES = ("guidance", "steps", "seed", "sampler", "adapter", "strength", "prompt")
AXIS_HELP = (
    "numbers: `1, 2, 4` or `START:STOP:STEP` (inclusive); sampler and adapter: names separated by commas "
    "(adapter `(none)` is the base alone); prompt: texts separated by `|`"
)
MAX_COLUMNS = 8


def parse_axis(axis: str, text: str, services) -> list[Any]:
    """The values of one axis, checked; raises InvalidRequest naming the bad one."""
    if axis not in AXES:
        raise InvalidRequest(f"unknown axis {axis!r}; choose one of {list(AXES)}")
    text = str(text or "").strip()
    if not text:
        raise InvalidRequest(f"the {axis} axis has no values; {AXIS_HELP}")
    if axis == "prompt":
        values = [t.strip() for t in text.split("|")]
        if not all(values):
            raise InvalidRequest("an empty prompt in the prompt axis; separate prompts with `|`")
        return values
    if axis in ("sampler", "adapter"):
        values = [t.strip() for t in text.split(",") if t.strip()]
        known = list(SCHEDULER_NAMES) if axis == "sampler" else [NO_ADAPTER, *[a.label for a in services.adapters()]]
        bad = [v for v in values if v not in known]
        if bad:
            raise InvalidRequest(f"unknown {axis}(s) {bad}; choose from {known}")
        return values
    if ":" in text:
        try:
            start, stop, step = (float(t) for t in text.split(":"))
        except ValueError:
            raise InvalidRequest(f"the {axis} axis must be START:STOP:STEP or a comma list, got {text!r}") from None
        if step <= 0 or stop < start:
            raise InvalidRequest(f"the {axis} axis {text!r} needs STEP > 0 and STOP >= START")
        n = round((stop - start) / step) + 1
        if n > 64:
            raise InvalidRequest(f"the {axis} axis {text!r} has {n} values; at most 64")
        values = [round(start + i * step, 6) for i in range(n)]
    else:
        try:
            values = [float(t) for t in text.split(",") if t.strip()]
        except ValueError:
            raise InvalidRequest(f"the {axis} axis must be numbers separated by commas, got {text!r}") from None
    if axis == "seed":
        return [to_int("seed value", v, 0, SEED_MAX) for v in values]
    if axis == "steps":
        return [to_int(f"{axis} value", v, 0) for v in values]
    return values


def _apply(form: Form, axis: str, value: Any) -> Form:
    if axis == "guidance":
        return replace(form, guidance=value)
    if axis == "steps":
        return replace(form, steps=value)
    if axis == "seed":
        return replace(form, seed=value)
    if axis == "sampler":
        return replace(form, scheduler=value)
    if axis == "prompt":
        return replace(form, prompt=value)
    if axis == "adapter":
        strength = form.adapters[0][1] if form.adapters else 1.0
        return replace(form, adapters=[(value, strength)] if value != NO_ADAPTER else [])
    if axis == "strength":
        if not form.adapters or form.adapters[0][0] in ("", NO_ADAPTER):
            raise InvalidRequest("a strength axis needs an adapter chosen in the form")
        return replace(form, adapters=[(form.adapters[0][0], value), *form.adapters[1:]])
    raise InvalidRequest(f"unknown axis {axis!r}")


def _label(axis: str, value: Any) -> str:
    if axis == "prompt":
        return value  # whole: the grid wraps it (histolab.ui.images.grid)
    return f"{axis} {value:g}" if isinstance(value, float) else f"{axis} {value}"


def xy_plot(services, session: dict, form: Form, x_axis, x_text, y_axis, y_text, progress=None) -> dict[str, Any]:
    from histolab.ui.images import grid, with_recipe

    if x_axis == y_axis:
        raise InvalidRequest(f"the X and Y axes are both {x_axis!r}; choose two different parameters")
    xs, ys = parse_axis(x_axis, x_text, services), parse_axis(y_axis, y_text, services)
    cells = len(xs) * len(ys)
    if cells > services.settings.max_grid_cells:
        raise InvalidRequest(f"{len(xs)} x {len(ys)} = {cells} cells; at most {services.settings.max_grid_cells} here")
    form = replace(form, batch=1, seed=check_seed(form.seed, allow_random=False))
    # Every cell is checked before the first is generated: a bad value late in an axis fails at once.
    plan = [[make_request(services, _apply(_apply(form, x_axis, x), y_axis, y)) for x in xs] for y in ys]
    cancel = _arm(session)
    rows, gallery = [], []
    try:
        for i, row in enumerate(plan):
            out_row = []
            for j, (source, request) in enumerate(row):
                if progress is not None:
                    progress((i * len(xs) + j) / cells, desc=f"cell {i * len(xs) + j + 1} of {cells}")
                g = run(services, source, request, cancel=cancel)[0]
                out_row.append(g.image)
                gallery.append((with_recipe(g.image, g.recipe), f"{_label(x_axis, xs[j])}, {_label(y_axis, ys[i])}"))
            rows.append(out_row)
    finally:
        session["cancel"] = None
    image = grid(
        rows,
        [_label(y_axis, y) for y in ys],
        [_label(x_axis, x) for x in xs],
        title=f"X: {x_axis}, Y: {y_axis}; seed {form.seed}",
    )
    return {"grid": image, "gallery": gallery}


def same_seeds(
    services, session: dict, form: Form, adapters: list[str], n, real_class: str | None, progress=None
) -> dict[str, Any]:
    """One row per model (the base, then each adapter alone at the form's strength), one column per seed,
    and a row of real patches of the class."""
    from histolab.ui.images import grid, with_recipe

    n = to_int("seeds", n, 1, MAX_COLUMNS)
    form = replace(form, seed=check_seed(form.seed, allow_random=False))  # every row shares the seeds: none random
    strength = form.adapters[0][1] if form.adapters else 1.0
    models = [("base", [])] + [(a, [(a, strength)]) for a in adapters if a and a != NO_ADAPTER]
    if len(models) * n > services.settings.max_grid_cells:
        raise InvalidRequest(f"{len(models)} rows x {n} seeds is more than {services.settings.max_grid_cells} cells")
    plan = [(label, make_request(services, replace(form, adapters=ads, batch=n))) for label, ads in models]
    cancel = _arm(session)
    rows, labels, gallery = [], [], []
    try:
        for k, (label, (source, request)) in enumerate(plan):
            if progress is not None:
                progress(k / len(plan), desc=f"{label} ({k + 1} of {len(plan)})")
            got = run(services, source, request, cancel=cancel)
            rows.append([g.image for g in got])
            labels.append(label if label == "base" else f"{label} x{strength:g}")
            gallery += [(with_recipe(g.image, g.recipe), f"{labels[-1]}, seed {g.recipe.seed}") for g in got]
    finally:
        session["cancel"] = None
    seeds = [request.seed + i for i in range(n)]
    if real_class and real_class != NO_CLASS:
        real = services.real_patches(real_class, n, seed=seeds[0])
        rows.append([im for im, _ in real] + [None] * (n - len(real)))
        labels.append(f"real {real_class}")
    image = grid(rows, labels, [f"seed {s}" for s in seeds], title=f"same seeds; prompt: {form.prompt}")
    return {"grid": image, "gallery": gallery}


def from_generate(values: list, n_adapters: int, projector_names: set[str] | None = None) -> dict[str, Any]:
    """The Generate form's values (as its ``parts["form"]`` sends them) as Compare's fields, and a note of
    everything Compare cannot take as it is (a random seed, reference mode, more seeds than columns)."""
    b, m, p, neg, _ref = values[:5]
    ad = values[5 : 5 + 2 * n_adapters]
    st, gd, sc, sd, bt = values[5 + 2 * n_adapters :]
    notes = []
    pairs = [(ad[2 * i], ad[2 * i + 1]) for i in range(n_adapters) if ad[2 * i] and ad[2 * i] != NO_ADAPTER]
    if m == "reference patch":
        dropped = [n for n, _ in pairs if n in (projector_names or set())]
        pairs = [(n, w) for n, w in pairs if n not in dropped]
        notes.append(
            "Compare works from the prompt: the reference patch"
            + (f" and {', '.join(dropped)} are" if dropped else " is")
            + " left out."
        )
    seed = check_seed(sd)
    if str(sd).strip() in (str(RANDOM_SEED), f"{RANDOM_SEED}.0"):
        notes.append(f"Generate's seed is -1 (random); Compare uses seed {seed}, the same for every row.")
    n = to_int("Images", bt, 1)
    if n > MAX_COLUMNS:
        notes.append(
            f"Generate makes {n} images; Compare shows {MAX_COLUMNS} seeds (columns) at most, so {MAX_COLUMNS}."
        )
        n = MAX_COLUMNS
    first = pairs[0] if pairs else (NO_ADAPTER, 1.0)
    return {
        "base": b,
        "prompt": p,
        "negative": neg,
        "steps": st,
        "guidance": gd,
        "scheduler": sc,
        "seed": seed,
        "adapter": first[0],
        "strength": first[1],
        "chosen": [name for name, _ in pairs],
        "n_seeds": n,
        "note": " ".join(["Settings from the Generate tab.", *notes]),
    }


def receive(generate_hook: OnLoad, compare_hook: OnLoad, tabs, compare_tab: str) -> None:
    """Wire the Generate tab's "Send to Compare": its form fills Compare's, and the Compare tab opens."""
    import gradio as gr

    from histolab.ui.generate import projectors

    services = compare_hook.parts["services"]
    keys = ["base", "prompt", "negative", "steps", "guidance", "scheduler", "seed", "adapter", "strength", "chosen"]
    keys += ["n_seeds", "note"]

    def on_send(*values):
        got = from_generate(list(values), generate_hook.parts["n_adapters"], {n for n, _ in projectors(services)})
        return (*[got[k] for k in keys], gr.Tabs(selected=compare_tab))

    generate_hook.parts["send"].click(
        ui_errors(on_send),
        inputs=generate_hook.parts["form"],
        outputs=[*[compare_hook.parts[k] for k in keys], tabs],
        api_visibility="private",
        queue=False,
    )


def _arm(session: dict) -> threading.Event:
    ev = threading.Event()
    session["cancel"] = ev
    return ev


def build(services, session_state):
    import gradio as gr

    from histolab.ui.spaces import gpu

    s = services.settings
    base_labels = [label for label, _ in services.base_choices()]
    with gr.Row():
        with gr.Column(scale=2):
            base = gr.Dropdown(base_labels, value=base_labels[0], label="Base model")
            prompt = gr.Textbox(label="Prompt", value=DEFAULT_PROMPT, lines=2, elem_id="compare-prompt")
            negative = gr.Textbox(label="Negative prompt", value="", elem_id="compare-negative")
            with gr.Row():
                steps = gr.Slider(1, s.max_steps, value=min(25, s.max_steps), step=1, label="Steps")
                guidance = gr.Slider(0.0, 20.0, value=7.5, step=0.1, label="Guidance")
            with gr.Row():
                scheduler = gr.Dropdown(list(SCHEDULER_NAMES), value="dpmpp_2m_karras", label="Sampler")
                seed = gr.Number(value=0, precision=0, minimum=0, label="Seed", elem_id="compare-seed")
            with gr.Row():
                adapter = gr.Dropdown(
                    [NO_ADAPTER], value=NO_ADAPTER, label="Adapter (X/Y plot; strength axis)", allow_custom_value=True
                )
                strength = gr.Slider(-2.0, 2.0, value=1.0, step=0.05, label="Strength")
        with gr.Column(scale=3):
            with gr.Tab("Same seeds"):
                chosen = gr.Dropdown(
                    [],
                    value=[],
                    multiselect=True,
                    allow_custom_value=True,
                    label="Adapters (each a row, beside the base)",
                )
                with gr.Row():
                    n_seeds = gr.Slider(1, MAX_COLUMNS, value=4, step=1, label="Seeds (columns)")
                    real_class = gr.Dropdown(
                        [NO_CLASS, *services.class_labels()], value=NO_CLASS, label="Real patches row"
                    )
                seeds_go = gr.Button("Compare", variant="primary", elem_id="compare-seeds-button")
            with gr.Tab("X/Y plot"):
                with gr.Row():
                    x_axis = gr.Dropdown(list(AXES), value="guidance", label="X axis", elem_id="xy-x-axis")
                    x_values = gr.Textbox(value="3, 7.5, 12", label="X values", elem_id="xy-x-values")
                with gr.Row():
                    y_axis = gr.Dropdown(list(AXES), value="adapter", label="Y axis")
                    y_values = gr.Textbox(value=NO_ADAPTER, label="Y values")
                gr.Markdown(AXIS_HELP)
                xy_go = gr.Button("Plot", variant="primary", elem_id="xy-plot-button")
            stop = gr.Button("Cancel", variant="stop")
            grid_image = gr.Image(label="Grid", type="pil", format="png", interactive=False, elem_id="compare-grid")
            cells = gr.Gallery(label="Cells (each PNG with its recipe)", format="png", columns=6)
            status = gr.Markdown("", elem_id="compare-status")

    common = [base, prompt, negative, steps, guidance, scheduler, seed, adapter, strength]

    def form_of(b, p, neg, st, gd, sc, sd, ad, sg) -> Form:
        return Form(b, "prompt", p, neg, None, [(ad, sg)] if ad and ad != NO_ADAPTER else [], st, gd, sc, sd, 1)

    @ui_errors
    def on_same_seeds(session, *values, progress=gr.Progress()):  # noqa: B008
        *form_values, ads, n, cls = values
        form = replace(form_of(*form_values), adapters=[(NO_ADAPTER, form_values[-1])])  # the rows' strength
        out = same_seeds(services, session if isinstance(session, dict) else new_session(), form, ads, n, cls, progress)
        return out["grid"], out["gallery"], ""

    seeds_go.click(
        gpu(on_same_seeds),
        inputs=[session_state, *common, chosen, n_seeds, real_class],
        outputs=[grid_image, cells, status],
        api_name="compare_seeds",
        concurrency_id=ACCELERATOR,
        concurrency_limit=1,
    )

    @ui_errors
    def on_xy(session, *values, progress=gr.Progress()):  # noqa: B008
        *form_values, xa, xv, ya, yv = values
        out = xy_plot(
            services,
            session if isinstance(session, dict) else new_session(),
            form_of(*form_values),
            xa,
            xv,
            ya,
            yv,
            progress,
        )
        return out["grid"], out["gallery"], ""

    xy_go.click(
        gpu(on_xy),
        inputs=[session_state, *common, x_axis, x_values, y_axis, y_values],
        outputs=[grid_image, cells, status],
        api_name="xy_plot",
        concurrency_id=ACCELERATOR,
        concurrency_limit=1,
    )

    def on_cancel(session):
        ev = (session or {}).get("cancel") if isinstance(session, dict) else None
        if ev is None:
            return "nothing is running in this session"
        ev.set()
        return "cancelling after the current image"

    stop.click(on_cancel, inputs=[session_state], outputs=[status], api_name="cancel_compare", queue=False)

    def on_page_load():
        names = [a.label for a in services.adapters() if a.usable]
        return gr.update(choices=[NO_ADAPTER, *names]), gr.update(choices=names)

    hook = OnLoad(on_page_load, [], [adapter, chosen])
    hook.parts = {
        "services": services,
        **dict(zip(["base", "prompt", "negative", "steps", "guidance", "scheduler", "seed"], common, strict=False)),
        "adapter": adapter,
        "strength": strength,
        "chosen": chosen,
        "n_seeds": n_seeds,
        "note": status,
    }
    return hook
