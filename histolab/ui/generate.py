"""The generation page: prompt, sampler settings, a gallery of PNGs with their recipes."""

from __future__ import annotations

from typing import Any

from histolab.errors import HistolabError, InvalidRequest
from histolab.recipe import JSON_KEY, PARAMETERS_KEY
from histolab.schedulers import SCHEDULER_NAMES

DEFAULT_PROMPT = "an h&e stained histology image of colon tissue"


def _int(name: str, value: Any) -> int:
    """Gradio numbers may arrive as floats or None; a non-integer is the user's error, said so."""
    if value is None or value == "":
        raise InvalidRequest(f"`{name}` is empty")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise InvalidRequest(f"`{name}` must be a whole number but is {value!r}") from None
    if f != int(f):
        raise InvalidRequest(f"`{name}` must be a whole number but is {value!r}")
    return int(f)


def generate_images(
    cache, settings, prompt, negative_prompt, steps, guidance, scheduler, seed, batch_size, progress=None
) -> tuple[list[tuple[Any, str]], str]:
    """Plain handler: (gallery items, the recipes as SD-webui text). Raises HistolabError."""
    from histolab.generation import GenerationRequest, generate

    steps, seed, batch_size = _int("steps", steps), _int("seed", seed), _int("batch size", batch_size)
    if batch_size > settings.max_batch:
        raise InvalidRequest(f"`batch size` must be at most {settings.max_batch} here but is {batch_size}")
    if steps > settings.max_steps:
        raise InvalidRequest(f"`steps` must be at most {settings.max_steps} here but is {steps}")
    try:
        guidance = float(guidance)
    except (TypeError, ValueError):
        raise InvalidRequest(f"`guidance_scale` must be a number but is {guidance!r}") from None
    request = GenerationRequest(
        prompt=prompt or "",
        negative_prompt=negative_prompt or "",
        steps=steps,
        guidance_scale=guidance,
        scheduler=scheduler,
        seed=seed,
        batch_size=batch_size,
    )
    request.validate()  # a bad value is reported before the model is loaded
    model = cache.get()
    on_step = None if progress is None else (lambda i, n: progress(i / n, desc=f"step {i} of {n}"))
    images = generate(model, request, progress=on_step)
    gallery = []
    for g in images:
        # Gradio writes the gallery's PNGs with the image's text metadata
        # (processing_utils.get_pil_metadata): the downloaded file carries its recipe.
        g.image.info[PARAMETERS_KEY] = g.recipe.to_parameters()
        g.image.info[JSON_KEY] = g.recipe.to_json()
        gallery.append((g.image, f"seed {g.recipe.seed}"))
    return gallery, "\n\n".join(g.recipe.to_parameters() for g in images)


def build(settings, cache) -> None:
    """The page's components and events, inside the caller's ``gr.Blocks``."""
    import gradio as gr

    def on_generate(prompt, negative, steps, guidance, scheduler, seed, batch, progress=gr.Progress()):  # noqa: B008  (Gradio injects progress this way)
        try:
            return generate_images(cache, settings, prompt, negative, steps, guidance, scheduler, seed, batch, progress)
        except HistolabError as exc:
            raise gr.Error(str(exc)) from exc

    with gr.Row():
        with gr.Column(scale=2):
            prompt = gr.Textbox(label="Prompt", value=DEFAULT_PROMPT, lines=2)
            negative = gr.Textbox(label="Negative prompt", value="", lines=1)
            with gr.Row():
                steps = gr.Slider(1, settings.max_steps, value=25, step=1, label="Steps")
                guidance = gr.Slider(0.0, 20.0, value=7.5, step=0.1, label="Guidance")
            with gr.Row():
                scheduler = gr.Dropdown(list(SCHEDULER_NAMES), value="dpmpp_2m_karras", label="Sampler")
                seed = gr.Number(value=0, precision=0, minimum=0, label="Seed (image i: seed + i)")
                batch = gr.Slider(1, settings.max_batch, value=4, step=1, label="Images")
            button = gr.Button("Generate", variant="primary")
        with gr.Column(scale=3):
            gallery = gr.Gallery(label="Images", format="png", columns=4, buttons=["download"])
            recipes = gr.Textbox(label="Recipes", lines=4, interactive=False)
    button.click(
        on_generate,
        inputs=[prompt, negative, steps, guidance, scheduler, seed, batch],
        outputs=[gallery, recipes],
        api_name="generate",
    )
