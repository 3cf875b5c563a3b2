"""Each paper's protocol as a plan: its training runs, how the best is chosen, its test set and its table.

* ``colon-2025`` (Kuzmin & Berezsky 2025): LoRA, DreamBooth, textual inversion and hypernetwork on SD 1.5,
  one model per tissue class (4 methods x the dataset's classes: 16 runs on Chaoyang), each trained on the
  whole class; no validation (the paper holds nothing out), so each run's last epoch is tested.
* ``uni2h-2026`` (Kuzmin & Berezsky 2026): the UNI2-h adapter's baseline and its eleven Table 6 ablations
  (12 runs over all classes); the best (configuration, epoch) by validation FID; one reference-mode generation
  per test patch with the adapter's recommended settings.
* ``cxr-2025``: the chest X-ray LoRA (one run, each image's own caption); one generation per test image from
  its caption; FID and IS.

``--smoke`` shrinks every run (a step or two, two images per class) and the test set, keeping the structure,
so the whole pipeline runs in minutes on a CPU with the embedded base and the bundled data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from histolab.errors import InvalidRequest
from histolab.training.config import TrainConfig, with_overrides
from histolab.training.presets import get_preset

PAPERS = ("colon-2025", "uni2h-2026", "cxr-2025")
COLON_METHODS = ("lora", "dreambooth", "ti", "hypernetwork")
UNI2H_RUNS = (
    "baseline",
    "rank4",
    "rank16",
    "tokens1",
    "tokens2",
    "tokens8",
    "depth3",
    "width512",
    "width2048",
    "lr-ratio-1x",
    "lr-ratio-5x",
    "lr-ratio-20x",
)
# Assumed seconds per optimiser step at batch 8 and 512 px on one H100-class GPU (not measured here: the
# estimate is for planning only and scales with batch size and pixel count).
ASSUMED_STEP_S = {"lora": 0.35, "dreambooth": 0.8, "textual_inversion": 0.3, "hypernetwork": 0.3, "projector": 0.4}
ASSUMED_IMAGE_S = 1.0  # one 512 px image at 30-50 steps, same card, same caveat

# What --smoke changes in every run: tiny sizes, CPU-friendly settings; everything else stays the paper's.
SMOKE = {
    "epochs": 1,
    "max_steps": None,
    "max_images_per_class": 2,
    "min_images_per_class": 1,
    "batch_size": 2,
    "repeats": 1,
    "augment": "none",
    "resolution": None,
    "mixed_precision": "no",
    "optimizer_cpu": "adamw",
    "samples_per_class": 0,
    "sample_steps": 1,  # one denoising step: every stage runs, the images are not the point
    # Validation at its smallest that still ranks epochs: FID, KID and k=3 precision/recall need 4 images a
    # side; 2 generations per class (3 classes: 6) instead of the presets' 32 (96 generations, most of a
    # smoke run's time on a CPU).
    "val_images_per_class": 2,
    "val_reference_images": 4,
    "label_names": "",
}
SMOKE_TEST_PER_CLASS = 4  # the fewest images a set may have for FID, KID and k=3 precision/recall


@dataclass
class RunPlan:
    id: str
    preset: str
    only_class: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)
    n_images: int = 0  # training images of this run
    steps: int = 0

    def config(self) -> TrainConfig:
        cfg = get_preset(self.preset).config()
        changes = {k: v for k, v in self.overrides.items() if hasattr(cfg, k)}
        if self.only_class:
            changes["only_classes"] = self.only_class
        return with_overrides(cfg, changes).check()


@dataclass
class Plan:
    paper: str
    runs: list[RunPlan]
    select: str  # "val-fid": best (configuration, epoch) by validation FID; "last": each run's last epoch
    test: str  # "class-prompt" | "reference" | "caption"
    metrics: tuple[str, ...]
    classes: list[str]
    test_counts: dict[str, int]
    smoke: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def total_steps(self) -> int:
        return sum(r.steps for r in self.runs)

    def gpu_hours(self) -> float:
        secs = 0.0
        for r in self.runs:
            cfg = r.config()
            px = ((cfg.resolution or 512) / 512) ** 2
            secs += r.steps * ASSUMED_STEP_S[cfg.method] * max(cfg.batch_size, 1) / 8 * px
            if cfg.validation != "none":
                secs += cfg.epochs * min(cfg.val_reference_images, 10**9) * ASSUMED_IMAGE_S * 0.25
        n_test = sum(self.test_counts.values()) * (len(self.runs) if self.select == "last" else 1)
        return (secs + n_test * ASSUMED_IMAGE_S) / 3600

    def lines(self) -> list[str]:
        out = [
            f"reproduce {self.paper}{' (smoke scale)' if self.smoke else ''}: {len(self.runs)} training runs, "
            f"{self.total_steps:,} optimiser steps in all",
            f"  classes: {', '.join(self.classes)}; test images per class: "
            + ", ".join(f"{c} {n}" for c, n in self.test_counts.items()),
            f"  selection: {'best (configuration, epoch) by validation FID' if self.select == 'val-fid' else 'each run as trained (nothing held out, no validation)'}",
            f"  test set: {dict(reference='one reference-mode generation per test patch', caption='one generation per test image from its caption').get(self.test, 'per class, as many generations as test images, from the class prompt')}",
            f"  metrics per class: {', '.join(self.metrics)}",
        ]
        for r in self.runs:
            cfg = r.config()
            out.append(
                f"  run {r.id}: preset {r.preset}{' class ' + r.only_class if r.only_class else ''}, "
                f"{r.n_images} images x {cfg.repeats} repeats, batch {cfg.batch_size}, "
                f"{'max_steps ' + str(cfg.max_steps) if cfg.max_steps else str(cfg.epochs) + ' epochs'}: "
                f"{r.steps:,} steps, lr {cfg.lr:g}, optimizer {cfg.optimizer}, seed {cfg.seed}"
            )
        out.append(
            f"  estimated GPU hours: {self.gpu_hours():.1f} (assumed per-step times on one H100-class GPU, "
            "not measured: see histolab.reproduce.plan.ASSUMED_STEP_S)"
        )
        out += [f"  note: {n}" for n in self.notes]
        return out


def steps_of(cfg: TrainConfig, n_images: int, world: int = 1) -> int:
    if cfg.max_steps:
        return int(cfg.max_steps)
    per_step = cfg.batch_size * cfg.grad_accum * world
    return math.ceil(n_images * cfg.repeats / per_step) * cfg.epochs


def smoke_overrides(device_is_cuda: bool) -> dict[str, Any]:
    o = {k: v for k, v in SMOKE.items() if k != "optimizer_cpu"}
    if not device_is_cuda:
        o["optimizer"] = SMOKE["optimizer_cpu"]  # 8-bit AdamW needs CUDA; the smoke run says so in its plan
    return o


def build_plan(
    paper: str,
    counts: dict[str, dict[str, int]],
    *,
    smoke: bool = False,
    cuda: bool = False,
    encoder: str | None = None,
    extra: dict[str, Any] | None = None,
    only_runs: list[str] | None = None,
) -> Plan:
    """``counts``: {split: {class: images}} of the dataset (train/val/test); ``only_runs``: a subset of the
    paper's run ids (one ablation, one class), the rest of the protocol unchanged."""
    plan = _build(paper, counts, smoke=smoke, cuda=cuda, encoder=encoder, extra=extra)
    if only_runs:
        known = [r.id for r in plan.runs]
        unknown = [r for r in only_runs if r not in known]
        if unknown:
            raise InvalidRequest(f"{paper} has no run {unknown[0]!r}; its runs are {', '.join(known)}")
        plan.runs = [r for r in plan.runs if r.id in only_runs]
        plan.notes.append(f"only runs {', '.join(only_runs)} of the paper's {len(known)}")
    return plan


def _build(paper, counts, *, smoke, cuda, encoder, extra) -> Plan:
    if paper not in PAPERS:
        raise InvalidRequest(f"unknown paper {paper!r}: choose one of {', '.join(PAPERS)}")
    classes = list(counts.get("train", {}))
    if not classes:
        raise InvalidRequest("the dataset has no training images")
    test = dict(counts.get("test", {}))
    notes: list[str] = []
    if not any(test.values()):
        raise InvalidRequest(
            "the dataset has no test split: the papers' tables are measured on held-out test images "
            "(a split column/folder/JSON named test)"
        )
    over: dict[str, Any] = dict(extra or {})
    if smoke:
        over = {**smoke_overrides(cuda), **over}
        test = {c: min(n, SMOKE_TEST_PER_CLASS) for c, n in test.items()}
        if not cuda:
            notes.append("smoke on CPU: optimizer adamw instead of the paper's 8-bit AdamW (CUDA only)")
    runs: list[RunPlan] = []

    def n_train(cls_list, holdout):
        n = sum(counts.get("train", {}).get(c, 0) for c in cls_list)
        if holdout == "none":
            n += sum(counts.get("val", {}).get(c, 0) for c in cls_list)
        return n

    def add(rid: str, preset: str, only: str = "", **more):
        rp = RunPlan(rid, preset, only, {**over, **more})
        cfg = rp.config()
        n = n_train([only] if only else classes, cfg.holdout)
        if cfg.max_images_per_class:
            n = min(n, cfg.max_images_per_class * (1 if only else len(classes)))
        rp.n_images, rp.steps = n, steps_of(cfg, n)
        runs.append(rp)

    if paper == "colon-2025":
        for m in COLON_METHODS:
            for c in classes:
                add(
                    f"{m}-{c}",
                    f"chaoyang-2025-{m}",
                    c,
                    **({"num_class_images": 1, "class_image_steps": 1} if smoke and m == "dreambooth" else {}),
                )
        return Plan(
            paper,
            runs,
            "last",
            "class-prompt",
            ("FID", "KID x1000", "precision", "recall"),
            classes,
            test,
            smoke,
            notes,
        )
    if paper == "uni2h-2026":
        enc = {"encoder": "embedded"} if smoke and not encoder else ({"encoder": "uni2-h"} if encoder else {})
        for name in UNI2H_RUNS:
            add(name, f"uni2h-2026-{name}", **enc)
        return Plan(
            paper,
            runs,
            "val-fid",
            "reference",
            ("FID", "KID x1000", "precision", "recall"),
            classes,
            test,
            smoke,
            notes,
        )
    add("cxr", "cxr-2025-lora")
    return Plan(
        paper, runs, "last", "caption", ("FID", "IS", "KID x1000", "precision", "recall"), classes, test, smoke, notes
    )
