"""Guidance sweeps: generate at each guidance scale, measure against real images, pick the best.

Reference-patch mode sweeps 1.0 to 2.0 in steps of 0.1 (the 2026 paper's
Table 5); text mode sweeps around SD 1.5's usual 7.5. Every scale uses the
same seeds (image i of class c has the same seed at every scale), so the
differences between rows come from the guidance alone.

Reference mode needs a foundation-embedding adapter among ``adapters`` (the
generation engine tells which); references are taken from the reference set,
class by class, cycling when there are fewer references than images.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from histolab.errors import InvalidRequest
from histolab.evaluation.evaluate import EvalConfig, compare, metric_name
from histolab.evaluation.features import collect
from histolab.evaluation.images import ImageSet, images_from_pil

REFERENCE_SCALES = tuple(round(1.0 + 0.1 * i, 1) for i in range(11))  # 1.0, 1.1, ..., 2.0
TEXT_SCALES = (4.0, 5.0, 6.0, 7.0, 7.5, 8.0, 9.0, 10.0)  # around 7.5, SD 1.5's usual


@dataclass(frozen=True)
class SweepConfig:
    mode: str = "prompt"  # "prompt" (text) or "reference" (reference patch through an encoder adapter)
    scales: tuple[float, ...] = ()  # empty: REFERENCE_SCALES or TEXT_SCALES by mode
    images_per_class: int = 50  # per scale; FID at this size is biased, but equally at every scale
    steps: int = 25  # DPM++ 2M Karras is converged by ~25 steps
    scheduler: str = "dpmpp_2m_karras"
    seed: int = 0
    batch_size: int = 8  # generation batch; images do not depend on it
    negative_prompt: str = ""
    save_images: bool = False
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(per_class=True, kid_subsets=20))

    def resolved_scales(self) -> tuple[float, ...]:
        if self.mode not in ("prompt", "reference"):
            raise InvalidRequest(f"sweep mode must be 'prompt' or 'reference', got {self.mode!r}")
        scales = self.scales or (REFERENCE_SCALES if self.mode == "reference" else TEXT_SCALES)
        if any(not (0 <= s <= 50) for s in scales):
            raise InvalidRequest(f"guidance scales must be in [0, 50], got {scales}")
        return tuple(float(s) for s in scales)


def parse_scales(text: str) -> tuple[float, ...]:
    """'1.0:2.0:0.1' (start:stop:step, inclusive) or '5,7.5,10'."""
    try:
        if ":" in text:
            start, stop, step = (float(t) for t in text.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            n = round((stop - start) / step) + 1
            return tuple(round(start + i * step, 6) for i in range(n))
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise InvalidRequest(f"scales must be START:STOP:STEP or a comma list, got {text!r}") from None


def sweep_guidance(
    model,
    real: ImageSet,
    extractors: list,
    config: SweepConfig,
    *,
    prompts: dict[str, str] | str = "",
    adapters: Sequence = (),
    references: ImageSet | None = None,
    out_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    cancel: threading.Event | None = None,
) -> dict:
    """One row of metrics per guidance scale; ``best`` names the scale with the lowest FID (or FD)."""
    from histolab.generation import AdapterSpec, GenerationRequest, generate

    scales = config.resolved_scales()
    if config.images_per_class < 2:
        raise InvalidRequest(f"images per class must be at least 2, got {config.images_per_class}")
    classes: list[str | None] = list(real.classes) or [None]
    if isinstance(prompts, str):
        prompts = {c: prompts for c in classes}
    missing = [c for c in classes if c not in prompts]
    if missing:
        raise InvalidRequest(f"no prompt for classes {missing}: give one prompt per class of the real set")
    adapters = tuple(a if isinstance(a, AdapterSpec) else AdapterSpec(str(a)) for a in adapters)
    refs_by_class = _references(
        config.mode, references if references is not None else real, classes, config.images_per_class
    )
    out_path = Path(out_dir) if out_dir is not None else None
    cfg_eval = replace_per_class(config.eval, real)
    real_feats = collect(extractors, real, batch_size=cfg_eval.batch_size)
    rows = []
    for scale in scales:
        images, labels = [], []
        for ci, cls in enumerate(classes):
            seeds = [config.seed + ci * 100_000 + i for i in range(config.images_per_class)]
            base = GenerationRequest(
                prompt=prompts[cls],
                negative_prompt=config.negative_prompt,
                mode=config.mode,
                guidance_scale=scale,
                steps=config.steps,
                scheduler=config.scheduler,
                adapters=adapters,
            )
            for start in range(0, len(seeds), config.batch_size):
                chunk = seeds[start : start + config.batch_size]
                if config.mode == "prompt":
                    req = _with(base, batch_size=len(chunk), seed=chunk[0])
                    got = generate(model, req, seeds=chunk, cancel=cancel)
                else:
                    got = []
                    for j, s in enumerate(chunk):
                        ref = refs_by_class[cls][(start + j) % len(refs_by_class[cls])]
                        got += generate(model, _with(base, reference=ref, seed=s), seeds=[s], cancel=cancel)
                images += [g.image for g in got]
                labels += [cls] * len(got)
            if progress:
                progress(f"guidance {scale:g}: {cls or 'all'} done")
        if out_path is not None and config.save_images:
            for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
                dest = out_path / f"guidance_{scale:g}" / (lab or "all") / f"{i:05d}.png"
                dest.parent.mkdir(parents=True, exist_ok=True)
                img.save(dest)
        fake = images_from_pil(images, labels, spec=f"guidance {scale:g}")
        fake_feats = collect(extractors, fake, batch_size=cfg_eval.batch_size)
        row: dict = {"guidance": scale, "n_fake": len(images)}
        for ex in extractors:
            res = compare(real_feats[ex.name], fake_feats[ex.name], cfg_eval, warn=lambda m: None)
            for k, v in res["overall"].items():
                row[f"{ex.name}/{k}"] = v
            for c, values in res.get("per_class", {}).items():
                for k in (metric_name(ex.name), "kid_mean"):
                    if k in values:
                        row[f"{ex.name}/{c}/{k}"] = values[k]
        rows.append(row)
    key = f"{extractors[0].name}/{metric_name(extractors[0].name)}"
    best = min(rows, key=lambda r: r.get(key, float("inf")))
    result = {
        "mode": config.mode,
        "scales": list(scales),
        "config": {k: v for k, v in asdict(config).items() if k != "eval"},
        "prompts": {str(k): v for k, v in prompts.items()},
        "adapters": [asdict(a) for a in adapters],
        "real": {"spec": real.spec, "n": len(real)},
        "rows": rows,
        "best": {"guidance": best["guidance"], "by": key, "value": best.get(key)},
    }
    if out_path is not None:
        write_sweep(result, out_path)
    return result


def write_sweep(result: dict, out_dir) -> list[Path]:
    from histolab.evaluation.report import plot_series, write_csv, write_json

    out = Path(out_dir)
    rows = result["rows"]
    metric = result["best"]["by"]
    space = metric.split("/")[0]
    series = {metric: [r.get(metric) for r in rows]}
    return [
        write_json(result, out / "sweep.json"),
        write_csv(rows, out / "sweep.csv"),
        plot_series(
            [r["guidance"] for r in rows],
            series,
            "guidance scale",
            metric_name(space).upper(),
            f"{metric_name(space).upper()} by guidance ({result['mode']} mode, {space})",
            out / "fid_by_guidance.png",
        ),
    ]


def _with(req, **changes):
    from dataclasses import replace

    return replace(req, **changes)


def replace_per_class(cfg: EvalConfig, real: ImageSet) -> EvalConfig:
    from dataclasses import replace

    return replace(cfg, per_class=cfg.per_class and bool(real.classes))


def _references(mode: str, ref_set: ImageSet, classes, needed: int) -> dict:
    """Up to ``needed`` reference patches per class (only those are ever used)."""
    if mode != "reference":
        return {}
    out = {}
    for c in classes:
        idx = [i for i, lab in enumerate(ref_set.labels) if c is None or lab == c]
        if not idx:
            raise InvalidRequest(f"no reference images of class {c!r} in {ref_set.spec}")
        out[c] = [ref_set.load(i) for i in idx[:needed]]
    return out
