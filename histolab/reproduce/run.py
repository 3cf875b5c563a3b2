"""Run a paper's plan: train every run, choose, generate the test set, evaluate per class, write the table.

Every stage (one training run, the choice, one run's test generations, one run's evaluation, the table) is
recorded in ``OUT/reproduce_state.json`` when it finishes, written atomically; a rerun of the same command
skips what is recorded and resumes a training run from its own saved state (histolab.training's resume), so a
kill at any point costs at most the unfinished stage's work since its last save. ``stop_after`` stops after
that many stages of this invocation (a deterministic stand-in for a kill, and a way to work in slices on a
time-limited machine).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from histolab.errors import HistolabError, InvalidRequest
from histolab.reproduce.plan import Plan, RunPlan
from histolab.reproduce.processes import Processes
from histolab.training.data import label_slug

STATE_NAME = "reproduce_state.json"
FID_KEY = "inception/fid"


class Stopped(HistolabError):
    """Raised after ``stop_after`` stages; the state file holds everything done so far."""


@dataclass
class TestItem:
    name: str
    label: str
    loader: Any  # () -> PIL image
    caption: str | None = None


# ------------------------------------------------------------------ data


def _dataset(source: str, label_names: str):
    from histolab.data.loaders import load_dataset, load_json
    from histolab.training.data import is_json_index, label_names_for

    p = Path(source)
    if label_names and is_json_index(p):
        return load_json(p, label_names=label_names_for(label_names))
    return load_dataset(p)


def dataset_counts(data: str, test: str | None, label_names: str = "") -> dict[str, dict[str, int]]:
    """{split: {class: images}} without decoding any image (the plan's step counts)."""
    from collections import Counter

    if data == "bundled":
        from histolab.data import bundled

        counts = {s: dict(Counter(c.label for c in bundled.crops(s))) for s in ("train", "val")}
    else:
        ds = _dataset(data, label_names)
        counts = {
            "train": dict(Counter(r.label for r in ds.records if r.split in ("train", None))),
            "val": dict(Counter(r.label for r in ds.records if r.split == "val")),
        }
    counts["test"] = dict(Counter(it.label for it in test_items(data, test, label_names)))
    return counts


def test_items(data: str, test: str | None, label_names: str = "") -> list[TestItem]:
    """The held-out test images: ``test`` (a dataset or image-set spec) or the dataset's own test split."""
    if test is None and data == "bundled":
        test = "bundled:test"
    if test is not None and (test.startswith("bundled:") or Path(test).is_dir()):
        from histolab.evaluation.images import open_image_set

        s = open_image_set(test)
        return [TestItem(it.name, it.label, it.loader) for it in s.items if it.label is not None]
    ds = _dataset(test or data, label_names)
    recs = [(i, r) for i, r in enumerate(ds.records) if r.split == "test"]
    if not recs and test is not None:
        recs = list(enumerate(ds.records))  # a file given as the test set: all of it
    return [TestItem(r.path.name, r.label, (lambda i=i, ds=ds: ds[i][0]), r.caption) for i, r in recs]


def cap_per_class(items: list[TestItem], counts: dict[str, int]) -> list[TestItem]:
    seen: dict[str, int] = {}
    out = []
    for it in items:
        if seen.get(it.label, 0) < counts.get(it.label, 0):
            out.append(it)
            seen[it.label] = seen.get(it.label, 0) + 1
    return out


# ------------------------------------------------------------------ state


class State:
    def __init__(self, out: Path, paper: str, key: dict[str, Any], write: bool = True):
        self.path, self.write = out / STATE_NAME, write
        self.data: dict[str, Any] = {"paper": paper, "key": key, "done": {}}
        if self.path.exists():
            saved = json.loads(self.path.read_text())
            if saved.get("paper") != paper or saved.get("key") != key:
                raise InvalidRequest(
                    f"{out} holds a reproduction of {saved.get('paper')} with other settings ({saved.get('key')}); "
                    "rerun with the same arguments or choose another --out"
                )
            self.data = saved

    def reload(self) -> None:
        self.data = json.loads(self.path.read_text())

    def done(self, stage: str) -> Any:
        return self.data["done"].get(stage)

    def record(self, stage: str, value: Any) -> None:
        from histolab.training.state import atomic_write

        self.data["done"][stage] = value
        if not self.write:
            return  # another process writes the file: this one keeps its own record in memory
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.data, indent=1, sort_keys=True)
        atomic_write(self.path, lambda tmp: tmp.write_text(text))


# ------------------------------------------------------------------ runner


class Reproduction:
    def __init__(
        self,
        plan: Plan,
        *,
        base: str,
        data: str,
        out: Path,
        test: str | None = None,
        encoder_weights: str | None = None,
        inception_head: str | None = None,
        device: str | None = None,
        stop_after: int | None = None,
        log=print,
        processes: Processes | None = None,
    ):
        self.procs = processes or Processes()
        self.plan, self.base, self.data, self.out = plan, base, data, Path(out)
        self.test, self.encoder_weights, self.inception_head = test, encoder_weights, inception_head
        self.device, self.stop_after = device, stop_after
        self.log = (log or (lambda m: None)) if self.procs.main else (lambda m: None)
        self.stages_run = 0
        key = {
            "base": str(base),
            "data": str(data),
            "test": test,
            "smoke": plan.smoke,
            "runs": [r.id for r in plan.runs],
        }
        self.state = State(self.out, plan.paper, key, write=self.procs.main)
        self.procs.barrier()  # every process has read the state before the main one changes it
        self._encoder = None
        self._inception = None

    # -- helpers
    def _stage(self, name: str, fn, who: str = "all"):
        """Run stage ``name`` unless recorded. ``who``: "all" (every process runs ``fn``: a training run, a share
        of the generations; then a barrier), "main" (the main process runs it, the others read its value
        back from the state file after the barrier) or "alone" (only the main process gets here: no barrier,
        the others have exited). Only the main process writes the state file."""
        got = self.state.done(name)
        if got is not None:
            return got
        if who == "all" or self.procs.main:
            value = fn()
            self.state.record(name, value)
        if who != "alone":
            self.procs.barrier()
        if who == "main" and not self.procs.main:
            self.state.reload()
            value = self.state.done(name)
        self.stages_run += 1
        if self.stop_after is not None and self.stages_run >= self.stop_after:
            raise Stopped(
                f"stopped after {self.stages_run} stage(s) as asked (last: {name}); rerun the same command to continue"
            )
        return value

    def encoder(self):
        if self._encoder is None and self.plan.paper == "uni2h-2026":
            from histolab.encoders import get_encoder

            name = self.plan.runs[0].config().encoder
            self._encoder = get_encoder(name, device=self._device(), weights=self.encoder_weights)
        return self._encoder

    def _device(self) -> str:
        if self.device:
            return self.device
        if self.procs.device:
            return self.procs.device  # cuda:LOCAL_RANK under a launcher
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    # -- stages
    def run(self) -> dict[str, Path]:
        """The whole protocol; the table's paths (empty on a process other than the main one, which stops once
        its share of the generations is made: see histolab.reproduce.processes)."""
        self.out.mkdir(parents=True, exist_ok=True)
        if self.procs.main:
            (self.out / "plan.txt").write_text("\n".join(self.plan.lines()) + "\n")
        results = {r.id: self._stage(f"train:{r.id}", lambda r=r: self._train(r)) for r in self.plan.runs}
        chosen = self._stage("select", lambda: self._select(results), who="main")
        items = cap_per_class(test_items(self.data, self.test, self._label_names()), self.plan.test_counts)
        if not items:
            raise InvalidRequest("no test images to generate for")
        # Every chosen run's test set first (shared across processes), then the evaluations (the main one's).
        for rid in chosen:
            self._stage(f"generate:{rid}", lambda rid=rid: self._generate(rid, items))
        if not self.procs.main:
            return {}
        evals = {
            rid: self._stage(f"evaluate:{rid}", lambda rid=rid: self._evaluate(rid, items), who="alone")
            for rid in chosen
        }
        return self._stage("table", lambda: self._table(results, chosen, evals), who="alone")

    def _label_names(self) -> str:
        return self.plan.runs[0].config().label_names if self.data != "bundled" else ""

    def _train(self, r: RunPlan) -> dict[str, Any]:
        from histolab.training.loop import train

        cfg = r.config()
        res = train(
            cfg,
            base=self.base,
            data=self.data,
            out=self.out / "runs" / r.id,
            resume=True,
            preset=r.preset,
            encoder=self.encoder() if cfg.method == "projector" else None,
            device=self.device,
            log=self.log,
        )
        return {"status": res.status, "best_epoch": res.best_epoch, "history": res.history, "steps": res.step}

    def _select(self, results: dict[str, dict]) -> list[str]:
        if self.plan.select == "last":
            return list(results)
        scored = {}
        for rid, res in results.items():
            fids = [h[FID_KEY] for h in res["history"] if isinstance(h.get(FID_KEY), float)]
            if fids:
                scored[rid] = min(fids)
        if not scored:
            raise InvalidRequest("no run has a validation FID to choose by; is the dataset's validation split empty?")
        best = min(scored, key=scored.get)
        self.log(f"best configuration by validation FID: {best} ({scored[best]:.4g})")
        return [best]

    def _requests(self, rid: str, items: list[TestItem]):
        from histolab.generation import GenerationRequest

        run = next(r for r in self.plan.runs if r.id == rid)
        cfg = run.config()
        out = []
        for k, it in enumerate(items):
            if run.only_class and it.label != run.only_class:
                continue
            common = dict(steps=cfg.sample_steps, guidance_scale=cfg.sample_guidance, scheduler=cfg.sample_scheduler)
            common.update(seed=k, width=cfg.resolution, height=cfg.resolution) if cfg.resolution else common.update(
                seed=k
            )
            if self.plan.test == "reference":
                from histolab.adapters.recommended import recommended_settings

                common.update(recommended_settings(str(self.out / "runs" / rid)))  # the paper's 1.3 / DDPM / 30
                if self.plan.smoke:  # the paper's scheduler and guidance, the smoke scale's step count
                    common["steps"] = cfg.sample_steps
                out.append((it, GenerationRequest(mode="reference", reference=it.loader().convert("RGB"), **common)))
            else:
                prompt = it.caption if (self.plan.test == "caption" and it.caption) else class_prompt(cfg, it.label)
                out.append((it, GenerationRequest(prompt=prompt, **common)))
        return out

    def _generate(self, rid: str, items: list[TestItem]) -> int:
        from histolab.training.sampling import EpochSampler

        folder = self.out / "generated" / rid
        todo = [(it, req) for it, req in self._requests(rid, items)]
        mine = set(self.procs.owned(len(todo)))  # this process's share (all of it when alone)
        sampler = EpochSampler(self.base, device=self._device(), encoder=self.encoder())
        made = 0
        try:
            for k, (it, req) in enumerate(todo):
                dest = folder / it.label / f"{k:05d}.png"
                if k not in mine or dest.exists():
                    continue  # made before a stop
                (im,) = sampler.generate(self.out / "runs" / rid, [req])
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp = dest.with_suffix(".tmp.png")
                im.save(tmp)
                os.replace(tmp, dest)
                made += 1
        finally:
            sampler.close()
        return len(todo)

    def _evaluate(self, rid: str, items: list[TestItem]) -> dict[str, Any]:
        from histolab.evaluation.evaluate import EvalConfig
        from histolab.evaluation.extractors import get_extractor
        from histolab.evaluation.images import ImageRef, ImageSet, open_image_set
        from histolab.evaluation.runner import evaluate_sets

        run = next(r for r in self.plan.runs if r.id == rid)
        real_items = [it for it in items if not run.only_class or it.label == run.only_class]
        real = ImageSet("test", [ImageRef(it.name, it.label, it.loader) for it in real_items])
        fake = open_image_set(self.out / "generated" / rid)
        if self._inception is None:  # one network for every run's evaluation (colon-2025 has 16)
            head = self.inception_head if "IS" in self.plan.metrics else None
            self._inception = get_extractor("inception", device=self._device(), logits_head=head)
        ex = self._inception
        cfg = EvalConfig(
            per_class=True, kid_subsets=10 if self.plan.smoke else 100, is_splits=2 if self.plan.smoke else 10
        )
        # No feature cache: it stores d x d moments per class and set (hundreds of MB for one run's pair), far
        # more than recomputing the test set's Inception features costs.
        rep = evaluate_sets(real, fake, [ex], cfg, warn=lambda m: None)
        space = rep["spaces"]["inception"]
        return {
            "per_class": space.get("per_class", {}),
            "overall": space["overall"],
            "note": space.get("inception_score_note", ""),
        }

    def _table(self, results, chosen, evals) -> dict[str, str]:
        from histolab.reproduce.table import write_tables

        paths = write_tables(self.out, self.plan, results, chosen, evals)
        return {k: str(v) for k, v in paths.items()}


def class_prompt(cfg, label: str) -> str:
    slug = label_slug(label)
    if cfg.method == "textual_inversion":
        return cfg.prompt_template.format(label=slug, token=cfg.token_template.format(label=slug))
    return cfg.prompt_template.format(label=slug)
