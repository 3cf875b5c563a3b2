"""Builders shared by the review tests (no tests here).

Real images are crops of the bundled tissue data; "generated" images are PNGs
that carry a histolab recipe exactly as the generator writes them (through
``histolab.recipe.save_png``), with distinct pixels per model. The end-to-end
test in test_review_cli.py uses images from the real generator instead.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
import uuid
import zlib
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from histolab.data.prompts import CLASS_PROMPTS
from histolab.recipe import Recipe, save_png

CLASSES = tuple(CLASS_PROMPTS)
# Deliberately distinctive names: a blinding test searches every payload for them.
REAL = "zebrareal"
MODELS = ("lorakappa", "dreamyomega")


@functools.cache
def _master(per_class: int) -> Path:
    from histolab.data.bundled import materialize

    root = Path(tempfile.mkdtemp(prefix="histolab-review-src-"))
    materialize(root / "real", split="test", per_class=per_class, stride=32)
    materialize(root / "reference", split="val", per_class=2, stride=32)
    for j, model in enumerate(MODELS):
        d = root / model
        d.mkdir()
        for k, cls in enumerate(CLASSES):
            for i in range(per_class):
                rng = np.random.default_rng([j, k, i, zlib.crc32(model.encode())])
                base = rng.integers(90, 230, (1, 1, 3))
                arr = np.clip(base + rng.normal(0, 25, (48, 48, 3)), 0, 255).astype(np.uint8)
                recipe = Recipe(
                    base_model=f"{model}-base", base_hash="c0ffee" * 10 + "beef", prompt=CLASS_PROMPTS[cls], seed=i
                )
                save_png(Image.fromarray(arr), recipe, d / f"GENFILE_{model}_{cls}_{i}.png")
    return root


def make_sources(tmp: Path, per_class: int = 3) -> Path:
    """A fresh copy of real/, reference/ and one flat folder per model under ``tmp``."""
    src = _master(per_class)
    dest = tmp / "sources"
    shutil.copytree(src, dest)
    return dest


def study_dict(sources: Path, **over) -> dict:
    cfg = {
        "id": "s1",
        "owner": "olivia",
        "seed": 7,
        "image_size": 48,
        "prompts": dict(CLASS_PROMPTS),
        "sources": [
            {"name": REAL, "kind": "real", "path": str(sources / "real"), "classes": "subfolders"},
            *({"name": m, "kind": "generated", "path": str(sources / m)} for m in MODELS),
        ],
        "raters": ["ann", "bob"],
    }
    cfg.update(over)
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def answers_for(task, rng, **over):
    from histolab.review import Answers

    d = {
        "scores": {a.key: int(rng.integers(0, 11)) for a in task.aspects},
        "artefacts": tuple(a.key for a in task.artefacts if rng.random() < 0.2),
        "judgement": ("real", "synthetic")[int(rng.integers(0, 2))] if task.ask_judgement else None,
        "confidence": int(rng.integers(1, 6)) if task.ask_judgement else None,
        "ranking": tuple(rng.permutation(task.ranking_options)) if task.kind == "ranking" else (),
    }
    if task.kind == "ranking":
        d.update(scores={}, artefacts=(), judgement=None, confidence=None)
    d.update(over)
    return Answers(**d)


def new_id() -> str:
    return str(uuid.uuid4())


def table_counts(store) -> dict[str, int]:
    """Rows of every answer table, plus answered assignments: what a refused submit must not change."""
    db = store.db
    out = {
        t: db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
        for t in ("submissions", "ratings", "artefact_marks", "judgements", "comments", "rankings")
    }
    out["done"] = db.execute("SELECT COUNT(*) FROM assignments WHERE done_at IS NOT NULL").fetchone()[0]
    return out


def replayable_answers(task, rater: str):
    """Answers fixed by (rater, position): a client retrying after a crash sends exactly these again."""
    from histolab.review import Answers

    rng = np.random.default_rng([sum(map(ord, rater)), task.position])
    return Answers(
        scores={a.key: int(rng.integers(0, 11)) for a in task.aspects},
        artefacts=tuple(a.key for a in task.artefacts if rng.random() < 0.3),
        judgement=("real", "synthetic")[int(rng.integers(0, 2))],
        confidence=int(rng.integers(1, 6)),
    )
