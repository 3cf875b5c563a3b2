"""The Evaluate tab (admin): FID/KID/precision-recall of image sets or of a checkpoint, per class and
per feature space, with the report's plots; guidance sweeps; and the list of background tasks.

Each evaluation is a background task (histolab.ui.tasks): the page follows it with a progress bar,
and it goes on, and is listed again, if the page is closed.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from histolab.errors import InvalidRequest
from histolab.ui.common import OnLoad, new_session, to_float, to_int, ui_errors
from histolab.ui.generate import NO_ADAPTER

FEATURES = ("inception", "embedded", "uni2h", "uni")
WAIT_S = 0.5


# ------------------------------------------------------------------ task functions


def _evaluate(services, real_spec: str, fake_spec: str, features: list[str], per_class: bool, max_images, ctx) -> dict:
    from histolab.evaluation.evaluate import EvalConfig
    from histolab.evaluation.images import open_image_set
    from histolab.evaluation.report import metric_rows, plot_per_class_kid, summary_lines, write_csv, write_json
    from histolab.evaluation.runner import evaluate_sets

    real = open_image_set(real_spec, max_images=max_images)
    fake = open_image_set(fake_spec, max_images=max_images)
    extractors = [services.extractor(n) for n in features]
    warnings: list[str] = []

    def progress(role: str, done: int, total: int) -> None:
        ctx.check_cancel()
        ctx.progress(
            0.5 * done / max(total, 1) + (0.5 if role == "fake" else 0.0), f"features of {role}: {done}/{total}"
        )

    config = EvalConfig(per_class=per_class, kid_subsets=50)
    report = evaluate_sets(real, fake, extractors, config, progress=progress, warn=warnings.append)
    write_json(report, ctx.folder / "evaluation.json")
    write_csv(metric_rows(report), ctx.folder / "metrics.csv")
    plots = []
    kid = plot_per_class_kid(report, ctx.folder / "kid_per_class.png")
    if kid:
        plots.append(kid.name)
    return {
        "summary": summary_lines(report),
        "warnings": warnings,
        "plots": plots,
        "files": ["evaluation.json", "metrics.csv"],
    }


def evaluate_task(services):
    def task(params: dict, ctx) -> dict:
        return _evaluate(
            services, params["real"], params["fake"], params["features"], params["per_class"], params["max_images"], ctx
        )

    return task


def checkpoint_task(services):
    """Generate images per class from a base (+ adapter), then evaluate them against the real set."""

    def task(params: dict, ctx) -> dict:
        from histolab.batch import generate_to_dir
        from histolab.data.prompts import CLASS_PROMPTS
        from histolab.generation import AdapterSpec, GenerationRequest

        model = services.model(params["base"])
        adapters = tuple(AdapterSpec(p, s) for p, s in params["adapters"])
        n = params["per_class"]
        fake = ctx.folder / "generated"
        for k, (cls, prompt) in enumerate(CLASS_PROMPTS.items()):
            req = GenerationRequest(
                prompt=prompt,
                guidance_scale=params["guidance"],
                steps=params["steps"],
                scheduler=params["scheduler"],
                seed=params["seed"] + 100_000 * k,
                batch_size=min(8, n),
                adapters=adapters,
            )

            def progress(d: int, total: int, k=k, cls=cls) -> None:
                ctx.progress(0.5 * (k + d / max(total, 1)) / len(CLASS_PROMPTS), f"generating {cls}: {d}/{total}")

            generate_to_dir(
                model,
                req,
                n,
                fake / cls,
                resume=(fake / cls / "run.json").exists(),
                progress=progress,
                cancel=ctx.cancel,
            )
        inner = _Shifted(ctx, 0.5)
        out = _evaluate(services, params["real"], str(fake), params["features"], True, None, inner)
        return out

    return task


class _Shifted:
    """A task context whose progress covers the second half of the bar."""

    def __init__(self, ctx, start: float):
        self._ctx, self._start = ctx, start
        self.folder, self.cancel = ctx.folder, ctx.cancel

    def progress(self, fraction: float, message: str = "") -> None:
        self._ctx.progress(self._start + (1 - self._start) * fraction, message)

    def check_cancel(self) -> None:
        self._ctx.check_cancel()


def sweep_task(services):
    def task(params: dict, ctx) -> dict:
        from histolab.data.prompts import CLASS_PROMPTS
        from histolab.evaluation.evaluate import EvalConfig
        from histolab.evaluation.images import open_image_set
        from histolab.evaluation.sweep import SweepConfig, sweep_guidance
        from histolab.generation import AdapterSpec

        model = services.model(params["base"])
        real = open_image_set(params["real"], max_images=params.get("max_real"))
        scales = tuple(params["scales"])
        config = SweepConfig(
            mode="prompt",
            scales=scales,
            images_per_class=params["per_class"],
            steps=params["steps"],
            scheduler=params["scheduler"],
            seed=params["seed"],
            eval=EvalConfig(per_class=True, kid_subsets=20),
        )
        done = [0]
        total = len(scales) * max(1, len(real.classes))

        def progress(msg: str) -> None:
            done[0] += 1
            ctx.progress(done[0] / total, msg)

        prompts = {c: CLASS_PROMPTS.get(c, c) for c in real.classes} if real.classes else params["prompt"]
        result = sweep_guidance(
            model,
            real,
            [services.extractor(n) for n in params["features"]],
            config,
            prompts=prompts,
            adapters=[AdapterSpec(p, s) for p, s in params["adapters"]],
            out_dir=ctx.folder,
            progress=progress,
            cancel=ctx.cancel,
        )
        best = result["best"]
        lines = [f"best guidance {best['guidance']:g} by {best['by']} = {best['value']:.4f}"]
        for r in result["rows"]:
            lines.append(f"guidance {r['guidance']:g}: {best['by']} = {r.get(best['by'], float('nan')):.4f}")
        return {
            "summary": lines,
            "warnings": [],
            "plots": ["fid_by_guidance.png"],
            "files": ["sweep.json", "sweep.csv"],
        }

    return task


def register(services) -> None:
    services.tasks.register("evaluate", evaluate_task(services))
    services.tasks.register("evaluate-checkpoint", checkpoint_task(services))
    services.tasks.register("sweep", sweep_task(services))


# ------------------------------------------------------------------ starting (plain handlers)


def _features(chosen) -> list[str]:
    chosen = [c for c in (chosen or []) if c]
    if not chosen:
        raise InvalidRequest("choose at least one feature space")
    bad = [c for c in chosen if c not in FEATURES]
    if bad:
        raise InvalidRequest(f"unknown feature space(s) {bad}; choose from {list(FEATURES)}")
    return chosen


def _set_spec(services, label: str) -> str:
    sets = services.image_sets()
    if label not in sets:
        raise InvalidRequest(f"unknown image set {label!r}; refresh the list")
    return sets[label]


def start_sets(services, session, real: str, fake: str, features, per_class: bool, max_images) -> str:
    admin = services.auth.require_admin(session)
    params = {
        "real": _set_spec(services, real),
        "fake": _set_spec(services, fake),
        "features": _features(features),
        "per_class": bool(per_class),
        "max_images": to_int("max images", max_images, 2, 1_000_000) if max_images not in (None, "", 0) else None,
    }
    return services.tasks.submit("evaluate", params, title=f"{fake} vs {real}", owner=admin.name).id


def _model_params(services, base: str, adapter: str, strength) -> dict:
    adapters = []
    if adapter and adapter != NO_ADAPTER:
        adapters.append([services.adapter_path(adapter), to_float("strength", strength, -4.0, 4.0)])
    problem = services.base_problem(services.resolve_base(base))
    if problem:
        from histolab.errors import ModelNotFound

        raise ModelNotFound(problem)
    return {"base": services.resolve_base(base), "adapters": adapters}


def start_checkpoint(
    services, session, base, adapter, strength, real, features, per_class, steps, guidance, seed
) -> str:
    admin = services.auth.require_admin(session)
    params = {
        **_model_params(services, base, adapter, strength),
        "real": _set_spec(services, real),
        "features": _features(features),
        "per_class": to_int("images per class", per_class, 2, services.settings.max_set_images),
        "steps": to_int("steps", steps, 1, services.settings.max_steps),
        "guidance": to_float("guidance", guidance, 0.0, 50.0),
        "scheduler": "dpmpp_2m_karras",
        "seed": to_int("seed", seed, 0),
    }
    title = f"{adapter if adapter and adapter != NO_ADAPTER else base} vs {real}"
    return services.tasks.submit("evaluate-checkpoint", params, title=title, owner=admin.name).id


def start_sweep(services, session, base, adapter, strength, real, features, scales, per_class, steps, seed) -> str:
    from histolab.evaluation.sweep import parse_scales

    admin = services.auth.require_admin(session)
    parsed = parse_scales(str(scales or ""))
    if not parsed or len(parsed) > 32:
        raise InvalidRequest(f"give 1 to 32 guidance scales, got {len(parsed)}")
    params = {
        **_model_params(services, base, adapter, strength),
        "real": _set_spec(services, real),
        "features": _features(features),
        "scales": list(parsed),
        "per_class": to_int("images per class", per_class, 2, services.settings.max_set_images),
        "steps": to_int("steps", steps, 1, services.settings.max_steps),
        "scheduler": "dpmpp_2m_karras",
        "seed": to_int("seed", seed, 0),
        "prompt": "",
    }
    return services.tasks.submit("sweep", params, title=f"guidance sweep {scales}", owner=admin.name).id


# ------------------------------------------------------------------ results


def task_rows(services) -> list[list[Any]]:
    return [[t.id, t.state, t.kind, t.title, f"{100 * t.fraction:.0f}%", t.message] for t in services.tasks.list()[:50]]


def result_view(services, session, task_id: str) -> dict[str, Any]:
    """What a finished (or running) task shows: its summary, metrics table, plots and a zip of its reports."""
    from PIL import Image

    from histolab.ui.images import zip_files

    services.auth.require_admin(session)
    info = services.tasks.get(task_id)
    folder = services.tasks.folder(info.id)
    res = info.result or {}
    text = [f"**{info.title}**: {info.state} {info.message}"]
    if res.get("summary"):
        text.append("```\n" + "\n".join(res["summary"]) + "\n```")
    if res.get("warnings"):
        text.append("\n".join(f"- {w}" for w in res["warnings"][:20]))
    rows = []
    metrics = folder / "metrics.csv"
    if metrics.is_file():
        import csv

        with open(metrics, newline="") as fh:
            rows = [
                [
                    r.get(k, "")
                    for k in (
                        "space",
                        "class",
                        "n_real",
                        "n_fake",
                        "fid",
                        "fd",
                        "kid_x1000_mean",
                        "precision",
                        "recall",
                    )
                ]
                for r in csv.DictReader(fh)
            ]
    plots = []
    for name in res.get("plots", []):
        p = folder / name
        if p.is_file():
            with Image.open(p) as im:
                plots.append((im.convert("RGB"), name))
    files = [folder / f for f in [*res.get("files", []), *res.get("plots", [])] if (folder / f).is_file()]
    archive = zip_files(files, f"{info.id}-{info.kind}.zip", root=folder) if files else None
    return {"text": "\n\n".join(text), "rows": rows, "plots": plots, "zip": archive, "state": info.state}


def follow(services, task_id: str, progress) -> None:
    """Block while the task runs, moving the page's progress bar (the task goes on if the page closes)."""
    while True:
        info = services.tasks.wait(task_id, WAIT_S)
        if progress is not None:
            progress(info.fraction, desc=info.message or info.state)
        if info.finished:
            return


# ------------------------------------------------------------------ the page


def build(services, session_state):
    register(services)
    base_labels = [label for label, _ in services.base_choices()]
    with gr.Column() as locked:
        gr.Markdown("Evaluation is for the admin: sign in as admin at the top of the page.")
    with gr.Column(visible=False) as panel:
        with gr.Row():
            real = gr.Dropdown(allow_custom_value=True, choices=[], label="Real images", elem_id="eval-real")
            features = gr.CheckboxGroup(
                list(FEATURES), value=["inception"], label="Feature spaces", elem_id="eval-features"
            )
        with gr.Tab("Sets"):
            with gr.Row():
                fake = gr.Dropdown(allow_custom_value=True, choices=[], label="Generated images", elem_id="eval-fake")
                per_class = gr.Checkbox(value=True, label="Per class")
                max_images = gr.Number(value=0, precision=0, label="At most N images per set (0: all)")
            sets_go = gr.Button("Evaluate", variant="primary", elem_id="eval-sets")
        with gr.Tab("Checkpoint"):
            with gr.Row():
                base = gr.Dropdown(base_labels, value=base_labels[0], label="Base model")
                adapter = gr.Dropdown(allow_custom_value=True, choices=[NO_ADAPTER], value=NO_ADAPTER, label="Adapter")
                strength = gr.Slider(-2.0, 2.0, value=1.0, step=0.05, label="Strength")
            with gr.Row():
                ck_n = gr.Number(value=50, precision=0, label="Images per class")
                ck_steps = gr.Slider(
                    1, services.settings.max_steps, value=min(25, services.settings.max_steps), step=1, label="Steps"
                )
                ck_guidance = gr.Slider(0.0, 20.0, value=7.5, step=0.1, label="Guidance")
                ck_seed = gr.Number(value=0, precision=0, label="Seed")
            ck_go = gr.Button("Generate and evaluate", variant="primary")
        with gr.Tab("Guidance sweep"):
            with gr.Row():
                sw_base = gr.Dropdown(base_labels, value=base_labels[0], label="Base model")
                sw_adapter = gr.Dropdown(
                    allow_custom_value=True, choices=[NO_ADAPTER], value=NO_ADAPTER, label="Adapter"
                )
                sw_strength = gr.Slider(-2.0, 2.0, value=1.0, step=0.05, label="Strength")
            with gr.Row():
                scales = gr.Textbox(value="4:10:1.5", label="Guidance scales (START:STOP:STEP or a comma list)")
                sw_n = gr.Number(value=20, precision=0, label="Images per class and scale")
                sw_steps = gr.Slider(
                    1, services.settings.max_steps, value=min(25, services.settings.max_steps), step=1, label="Steps"
                )
                sw_seed = gr.Number(value=0, precision=0, label="Seed")
            sw_go = gr.Button("Sweep", variant="primary")
        with gr.Accordion("Background tasks (batches, evaluations, sweeps)", open=True):
            with gr.Row():
                task = gr.Dropdown(allow_custom_value=True, choices=[], label="Task", elem_id="eval-task")
                refresh = gr.Button("Refresh")
                cancel = gr.Button("Cancel", variant="stop")
                again = gr.Button("Start again (resumes a batch)")
            tasks_table = gr.Dataframe(
                headers=["task", "state", "kind", "title", "progress", "message"], interactive=False, wrap=True
            )
        result = gr.Markdown("", elem_id="eval-result")
        metrics = gr.Dataframe(
            headers=["space", "class", "n real", "n fake", "FID", "FD", "KID x1000", "precision", "recall"],
            interactive=False,
        )
        plots = gr.Gallery(label="Plots", columns=2, format="png")
        archive = gr.File(label="Reports (zip)", interactive=False)

    def session(s):
        return s if isinstance(s, dict) else new_session()

    outputs = [result, metrics, plots, archive, tasks_table, task]

    def show(s, task_id, progress=None):
        if progress is not None:
            follow(services, task_id, progress)
        v = result_view(services, session(s), task_id)
        ids = [r[0] for r in task_rows(services)]
        return v["text"], v["rows"], v["plots"], v["zip"], task_rows(services), gr.update(choices=ids, value=task_id)

    @ui_errors
    def on_sets(s, r, f, feats, pc, mx, progress=gr.Progress()):  # noqa: B008
        return show(s, start_sets(services, session(s), r, f, feats, pc, mx), progress)

    sets_go.click(
        on_sets, [session_state, real, fake, features, per_class, max_images], outputs, api_name="evaluate_sets"
    )

    @ui_errors
    def on_checkpoint(s, b, a, st, r, feats, n, steps, g, sd, progress=gr.Progress()):  # noqa: B008
        return show(s, start_checkpoint(services, session(s), b, a, st, r, feats, n, steps, g, sd), progress)

    ck_go.click(
        on_checkpoint,
        [session_state, base, adapter, strength, real, features, ck_n, ck_steps, ck_guidance, ck_seed],
        outputs,
        api_name="evaluate_checkpoint",
    )

    @ui_errors
    def on_sweep(s, b, a, st, r, feats, sc, n, steps, sd, progress=gr.Progress()):  # noqa: B008
        return show(s, start_sweep(services, session(s), b, a, st, r, feats, sc, n, steps, sd), progress)

    sw_go.click(
        on_sweep,
        [session_state, sw_base, sw_adapter, sw_strength, real, features, scales, sw_n, sw_steps, sw_seed],
        outputs,
        api_name="guidance_sweep",
    )

    @ui_errors
    def on_show(s, task_id):
        if not task_id:
            return show_empty()
        return show(s, task_id)

    def show_empty():
        return "", [], [], None, task_rows(services), gr.update()

    task.change(on_show, [session_state, task], outputs, api_name="task_result")

    @ui_errors
    def on_refresh(s):
        services.auth.require_admin(session(s))
        ids = [r[0] for r in task_rows(services)]
        return task_rows(services), gr.update(choices=ids)

    refresh.click(on_refresh, [session_state], [tasks_table, task], api_name="tasks")

    @ui_errors
    def on_cancel(s, task_id):
        services.auth.require_admin(session(s))
        info = services.tasks.cancel(task_id)
        return f"task {info.id}: {info.state}; cancel asked", task_rows(services)

    cancel.click(on_cancel, [session_state, task], [result, tasks_table], api_name="task_cancel")

    @ui_errors
    def on_again(s, task_id, progress=gr.Progress()):  # noqa: B008
        admin = services.auth.require_admin(session(s))
        info = services.tasks.rerun(task_id, owner=admin.name, changes={"resume": True})
        return show(s, info.id, progress)

    again.click(on_again, [session_state, task], outputs, api_name="task_again")

    def on_page_load(s):
        if not services.auth.is_admin(session(s)):
            return (gr.update(visible=True), gr.update(visible=False), *[gr.update()] * 6)
        sets = list(services.image_sets())
        reals = [x for x in sets if "(real)" in x or "(dataset)" in x]
        gens = [x for x in sets if "(generated)" in x]
        names = [NO_ADAPTER, *[a.label for a in services.adapters() if a.usable]]
        rows = task_rows(services)
        return (
            gr.update(visible=False),
            gr.update(visible=True),
            gr.update(choices=reals, value=reals[0] if reals else None),
            gr.update(choices=gens, value=gens[0] if gens else None),
            gr.update(choices=names),
            gr.update(choices=names),
            rows,
            gr.update(choices=[r[0] for r in rows]),
        )

    return OnLoad(on_page_load, [session_state], [locked, panel, real, fake, adapter, sw_adapter, tasks_table, task])
