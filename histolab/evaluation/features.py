"""Extract features of an image set, streamed: images are decoded one batch at a time,
every feature space sees the same batch, and statistics accumulate as it goes.

``SpaceFeatures`` holds one set in one space: the float32 features (for KID,
precision/recall and nearest neighbours: 400 MB for 50,000 Inception vectors;
``keep=False`` drops them for FID-only runs), plus float64 running statistics
and cosine Gram sums, overall and per class. It saves to and loads from
safetensors, so the real side of a per-epoch validation is computed once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from histolab.errors import DataError
from histolab.evaluation.stats import CosineGram, RunningStats

ALL = "__all__"  # the key of the whole set's statistics
ProgressCallback = Callable[[int, int], None]  # (images done, total)


@dataclass
class SpaceFeatures:
    space: str
    dim: int
    weights_hash: str
    spec: str
    names: list[str]
    labels: list[str | None]
    features: np.ndarray | None
    stats: dict[str, RunningStats] = field(default_factory=dict)
    grams: dict[str, CosineGram] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def classes(self) -> list[str]:
        return sorted({lab for lab in self.labels if lab is not None})

    def rows(self, label: str | None = None) -> np.ndarray:
        """Features of the whole set (label None) or of one class."""
        if self.features is None:
            raise ValueError(f"features of {self.spec} were not kept (keep=False): only FID and Vendi are available")
        if label is None:
            return self.features
        return self.features[np.array([lab == label for lab in self.labels], dtype=bool)]

    def save(self, path: str | Path) -> Path:
        from safetensors.numpy import save_file

        arrays: dict[str, np.ndarray] = {}
        if self.features is not None:
            arrays["features"] = self.features
        for key, st in self.stats.items():
            for k, v in st.to_arrays().items():
                arrays[f"stats.{key}.{k}"] = np.ascontiguousarray(v)
        for key, g in self.grams.items():
            arrays[f"gram.{key}.g"] = g.g
            arrays[f"gram.{key}.n"] = np.array([g.n], dtype=np.int64)
        meta = {"space": self.space, "dim": self.dim, "weights_hash": self.weights_hash, "spec": self.spec}
        meta_json = {"names": self.names, "labels": self.labels}
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        save_file(arrays, str(p), metadata={**{k: str(v) for k, v in meta.items()}, "index": json.dumps(meta_json)})
        return p

    @classmethod
    def load(cls, path: str | Path) -> SpaceFeatures:
        from histolab.files import load_state_dict

        tensors, meta = load_state_dict(path)
        arrays = {k: v.numpy() for k, v in tensors.items()}
        index = json.loads(meta.get("index", "{}"))
        out = cls(
            space=meta["space"],
            dim=int(meta["dim"]),
            weights_hash=meta.get("weights_hash", ""),
            spec=meta.get("spec", ""),
            names=list(index.get("names", [])),
            labels=list(index.get("labels", [])),
            features=arrays.get("features"),
        )
        keys = {k[len("stats.") : k.rindex(".")] for k in arrays if k.startswith("stats.")}
        for key in keys:
            out.stats[key] = RunningStats.from_arrays(
                {f: arrays[f"stats.{key}.{f}"] for f in ("n", "shift", "s1", "s2")}
            )
            g = CosineGram(out.dim)
            g.g, g.n = arrays[f"gram.{key}.g"], int(arrays[f"gram.{key}.n"][0])
            out.grams[key] = g
        return out


def collect(
    extractors: list,
    image_set,
    *,
    batch_size: int = 32,
    keep: bool = True,
    progress: ProgressCallback | None = None,
) -> dict[str, SpaceFeatures]:
    """Features of ``image_set`` in every extractor's space, one pass over the images."""
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    n = len(image_set)
    labels = image_set.labels
    out = {}
    for ex in extractors:
        out[ex.name] = SpaceFeatures(
            space=ex.name,
            dim=ex.dim,
            weights_hash=ex.weights_hash,
            spec=image_set.spec,
            names=[it.name for it in image_set.items],
            labels=labels,
            features=np.empty((n, ex.dim), dtype=np.float32) if keep else None,
        )
        keys = [ALL, *sorted({lab for lab in labels if lab is not None})]
        out[ex.name].stats = {k: RunningStats(ex.dim) for k in keys}
        out[ex.name].grams = {k: CosineGram(ex.dim) for k in keys}
    done = 0
    for idx, images in image_set.batches(batch_size):
        for ex in extractors:
            f = np.asarray(ex.features(images), dtype=np.float32)
            if not np.isfinite(f).all():
                raise DataError(f"{ex.name} features of {image_set.spec} contain NaN or infinity (images {idx[0]}..)")
            sf = out[ex.name]
            if keep:
                sf.features[idx[0] : idx[-1] + 1] = f
            sf.stats[ALL].update(f)
            sf.grams[ALL].update(f)
            batch_labels = [labels[i] for i in idx]
            for lab in {b for b in batch_labels if b is not None}:
                rows = f[[b == lab for b in batch_labels]]
                sf.stats[lab].update(rows)
                sf.grams[lab].update(rows)
        done += len(idx)
        if progress is not None:
            progress(done, n)
    return out


def fingerprint(image_set) -> str:
    """sha256 over every image's name, label, size and RGB pixels, in order."""
    h = hashlib.sha256()
    for i, it in enumerate(image_set.items):
        img = image_set.load(i)
        h.update(f"{it.name}|{it.label}|{img.size}|".encode())
        h.update(img.tobytes())
    return h.hexdigest()


def collect_cached(extractors: list, image_set, cache_dir, *, batch_size: int = 32, progress=None):
    """``collect``, reusing features saved in ``cache_dir`` for the same images in the same space and weights."""
    if cache_dir is None:
        return collect(extractors, image_set, batch_size=batch_size, progress=progress)
    cache = Path(cache_dir)
    fp = fingerprint(image_set)
    names = [it.name for it in image_set.items]
    out, missing, paths = {}, [], {}
    for ex in extractors:
        key = hashlib.sha256(f"{fp}|{ex.name}|{ex.weights_hash}|{ex.dim}".encode()).hexdigest()[:24]
        paths[ex.name] = cache / f"{ex.name}-{key}.safetensors"
        if paths[ex.name].is_file():
            sf = SpaceFeatures.load(paths[ex.name])
            if sf.names == names and sf.features is not None:
                sf.spec = image_set.spec
                out[ex.name] = sf
                continue
        missing.append(ex)
    if missing:
        got = collect(missing, image_set, batch_size=batch_size, progress=progress)
        for name, sf in got.items():
            sf.save(paths[name])
        out.update(got)
    return out
