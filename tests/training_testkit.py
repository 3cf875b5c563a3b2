"""Helpers shared by tests/test_training_*.py: a tiny base model as a diffusers folder, quick configs,
a small user dataset on disk, and comparisons of saved training states."""

from __future__ import annotations

from pathlib import Path

import pytest
from adapters_testkit import SeededEncoder, save_pipeline

from histolab.training.config import with_overrides
from histolab.training.presets import get_preset

TINY_PRESETS = {
    "lora": "tiny-lora",
    "dreambooth": "tiny-dreambooth",
    "textual_inversion": "tiny-ti",
    "hypernetwork": "tiny-hypernetwork",
    "projector": "tiny-projector",
}
# Small enough for seconds per run on 2 cores; everything else is the tiny preset's.
QUICK = {
    "max_images_per_class": 4,
    "min_images_per_class": 2,
    "repeats": 1,
    "batch_size": 4,
    "augment": "flip",
    "validation": "none",
    "samples_per_class": 1,
    "sample_steps": 1,
    # fp32 whatever the CPU: the tiny presets' "auto" would be bf16 on some machines and fp32 on others, and
    # these tests compare states to float32 rounding (tests/test_training_precision.py runs "auto").
    "mixed_precision": "no",
}


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory) -> Path:
    """The seeded TINY base model saved as a diffusers pipeline folder (what `--base DIR` takes)."""
    from histolab.embedded.random_init import random_base

    return save_pipeline(random_base("tiny", seed=0), tmp_path_factory.mktemp("tiny-base") / "tiny")


def quick_config(method: str, **changes):
    """The method's tiny preset, shrunk by QUICK, with ``changes`` on top."""
    cfg = get_preset(TINY_PRESETS[method]).config()
    extra = dict(QUICK)
    if method == "dreambooth":
        extra.update(num_class_images=2, class_image_steps=1)
    extra.update(changes)
    return with_overrides(cfg, extra).check()


def encoder_for(method: str):
    return SeededEncoder(name="test-seeded-train", dim=48, seed=3) if method == "projector" else None


def max_state_difference(a, b) -> float:
    """Largest absolute difference over the trainable tensors and the optimiser moments of two states."""
    assert a.step == b.step, (a.step, b.step)
    assert set(a.trainable) == set(b.trainable)
    worst = max(float((a.trainable[k] - b.trainable[k]).abs().max()) for k in a.trainable)
    sa, sb = a.optimizer["state"], b.optimizer["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            worst = max(worst, float((sa[i][k] - sb[i][k]).abs().max()))
    return worst


def write_user_dataset(root: Path, per_class: dict[str, int], size: int = 40, seed: int = 0) -> Path:
    """class subfolders of small random-texture RGB PNGs (distinct per class)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for ci, (label, n) in enumerate(per_class.items()):
        d = root / label
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            base = np.array([60 + 60 * ci, 120, 200 - 50 * ci], dtype=np.float32)
            arr = np.clip(base + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(d / f"{label}_{i:03d}.png")
    return root
