"""Per-epoch validation for checkpoint choice (the 2026 paper's Table 4: FID by epoch).

The real side is extracted once (``ValidationReference.build``, cached as
safetensors keyed by the images' pixels and the extractors' weights), so each
epoch only extracts the features of its generated images::

    ref = ValidationReference.build(real_images, [InceptionExtractor()], cache_path="val_ref.safetensors")
    for epoch in ...:
        history.append({"epoch": epoch, **validation_metrics(ref, generated_images)})
    write_history(history, run_dir)   # validation.csv, validation.json, fid_by_epoch.png

Metrics come back flat, ``"<space>/<metric>"``: ``inception/fid``,
``inception/kid_mean``, ``inception/precision``, ``embedded/fd``, ...
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from histolab.errors import InvalidRequest
from histolab.evaluation.evaluate import EvalConfig, compare, metric_name
from histolab.evaluation.features import SpaceFeatures, collect, fingerprint
from histolab.evaluation.images import ImageSet, images_from_pil

# Fewer KID subsets than a final report: an epoch's number guides a choice,
# and 100 subsets of 1000 would cost more than the features at this size.
VALIDATION_CONFIG = EvalConfig(kid_subsets=20)


def _as_set(images, labels=None) -> ImageSet:
    return images if isinstance(images, ImageSet) else images_from_pil(list(images), labels, spec="validation")


@dataclass
class ValidationReference:
    spaces: dict[str, SpaceFeatures]
    fingerprint: str
    extractors: list

    @classmethod
    def build(cls, real, extractors: list, *, labels=None, batch_size: int = 32, cache_path=None):
        """Real-side features of ``real`` (ImageSet or PIL images), from ``cache_path`` when it matches."""
        if not extractors:
            raise InvalidRequest("validation needs at least one feature extractor")
        real = _as_set(real, labels)
        fp = fingerprint(real)
        cached = cls._load(cache_path, fp, extractors) if cache_path else None
        if cached is not None:
            return cls(cached, fp, extractors)
        spaces = collect(extractors, real, batch_size=batch_size)
        if cache_path:
            cls._save(cache_path, fp, spaces)
        return cls(spaces, fp, extractors)

    @staticmethod
    def _files(cache_path, names):
        base = Path(cache_path)
        return {n: base.with_name(f"{base.stem}.{n}{base.suffix or '.safetensors'}") for n in names}

    @classmethod
    def _save(cls, cache_path, fp: str, spaces: dict[str, SpaceFeatures]) -> None:
        for name, path in cls._files(cache_path, list(spaces)).items():
            sf = spaces[name]
            # The fingerprint travels in the spec field so that a stale cache is never used.
            replace(sf, spec=f"{sf.spec}#{fp}").save(path)

    @classmethod
    def _load(cls, cache_path, fp: str, extractors) -> dict[str, SpaceFeatures] | None:
        out = {}
        for ex in extractors:
            path = cls._files(cache_path, [ex.name])[ex.name]
            if not path.is_file():
                return None
            sf = SpaceFeatures.load(path)
            if not sf.spec.endswith(f"#{fp}") or sf.weights_hash != ex.weights_hash or sf.dim != ex.dim:
                return None
            out[ex.name] = sf
        return out


def validation_metrics(
    reference: ValidationReference,
    generated,
    *,
    labels=None,
    config: EvalConfig = VALIDATION_CONFIG,
    warn=lambda msg: None,
) -> dict[str, float]:
    """Metrics of this epoch's generated images (PIL list or ImageSet) against the cached real side."""
    fake = _as_set(generated, labels)
    feats = collect(reference.extractors, fake, batch_size=config.batch_size)
    out: dict[str, float] = {}
    for ex in reference.extractors:
        logits_fn = ex.logits if getattr(ex, "has_logits", False) else None
        res = compare(reference.spaces[ex.name], feats[ex.name], config, logits_fn=logits_fn, warn=warn)
        for group, values in [("", res["overall"])] + [(f"{c}/", v) for c, v in res.get("per_class", {}).items()]:
            for k, v in values.items():
                if isinstance(v, int | float):
                    out[f"{ex.name}/{group}{k}"] = float(v)
    return out


def write_history(history: list[dict], out_dir, metric: str | None = None) -> list[Path]:
    """validation.json, validation.csv and fid_by_epoch.png (or the chosen metric) for a training run."""
    from histolab.evaluation.report import plot_series, write_csv, write_json

    if not history:
        return []
    out = Path(out_dir)
    metric = metric or next((k for k in history[0] if k.endswith("/fid")), None)
    paths = [write_json(history, out / "validation.json"), write_csv(history, out / "validation.csv")]
    if metric:
        epochs = [h.get("epoch", i) for i, h in enumerate(history)]
        space = metric.split("/")[0]
        label = metric_name(space).upper() if metric.endswith(("/fid", "/fd")) else metric
        paths.append(
            plot_series(
                epochs,
                {metric: [h.get(metric) for h in history]},
                "epoch",
                label,
                f"{label} by epoch ({space})",
                out / "fid_by_epoch.png",
            )
        )
    return paths
