"""Image folders to try a study on: real bundled crops and generated sets with recipes.

``write_demo_sources(out)`` writes

- ``real/<class>/``: real 64 px crops from the bundled test band (class subfolders);
- ``reference/<class>/``: other real crops, from the validation band (shown as references);
- one flat folder per "model": images made by ``histolab.generation.generate``
  with each class's prompt, as PNGs that carry their recipes. The models are
  one base model at different guidance scales (a guidance sweep is a real
  comparison an expert panel is asked to judge).

The base model is the embedded default when it is installed, else a seeded
random TINY model (noise-like images: enough to exercise a study end to end).
This is what ``examples/study.yaml`` points at.
"""

from __future__ import annotations

from pathlib import Path

from histolab.data.prompts import CLASS_PROMPTS

# Guidance scales of the three demo "models": weak, SD 1.5's usual, strong.
DEMO_MODELS = (("guidance-2", 2.0), ("guidance-7", 7.5), ("guidance-12", 12.0))


def default_model():
    from histolab.config import EMBEDDED_BASE_DIR

    if (EMBEDDED_BASE_DIR / "model_index.json").exists():
        from histolab.pipeline import load_base

        return load_base("embedded")
    from histolab.embedded.random_init import random_base

    return random_base("tiny", seed=0)


def write_generated_set(model, out: str | Path, guidance: float, per_class: int, steps: int, seed: int) -> Path:
    from histolab.generation import GenerationRequest, generate
    from histolab.recipe import save_png

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for k, prompt in enumerate(CLASS_PROMPTS.values()):
        req = GenerationRequest(
            prompt=prompt, steps=steps, guidance_scale=guidance, batch_size=per_class, seed=seed + 1000 * k
        )
        for i, g in enumerate(generate(model, req)):
            save_png(g.image, g.recipe, out / f"{k:02d}_{i:04d}.png")
    return out


def write_demo_sources(
    out: str | Path,
    per_class: int = 10,
    references: int = 2,
    model=None,
    steps: int = 4,
    models: tuple[tuple[str, float], ...] = DEMO_MODELS,
    seed: int = 0,
) -> Path:
    from histolab.data.bundled import materialize

    out = Path(out)
    materialize(out / "real", split="test", per_class=per_class)
    materialize(out / "reference", split="val", per_class=references)
    model = model if model is not None else default_model()
    for j, (name, guidance) in enumerate(models):
        write_generated_set(model, out / name, guidance, per_class, steps, seed + 100_000 * (j + 1))
    return out
