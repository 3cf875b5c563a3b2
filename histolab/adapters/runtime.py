"""Apply adapters to a loaded base model for one request, and take them off after.

``applied(model, specs)`` resolves each spec to a folder or file, loads it
(cached by content hash), validates all of them against the model, and only
then applies them in order with their strengths; on exit everything is
removed and the model is as it was, bit for bit. If anything fails before or
during applying, whatever was applied is removed before the error propagates.

The runtime holds caches of parsed adapters and encoder embeddings. These are
keyed by content, hold nothing specific to a user or request, and are shared
by every request on the process (which is what makes switching fast).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from histolab.adapters.edit import ModelEdit
from histolab.adapters.loader import LoadedAdapter, Located, find_by_name, locate, open_located
from histolab.adapters.reference import EmbeddingCache
from histolab.config import Paths
from histolab.errors import AdapterError, AdapterWarning, InvalidRequest, ModelNotFound


@dataclass
class RuntimeConfig:
    # Room for several SD-1.5 LoRAs (10-150 MB each) and one SD-1.5 DreamBooth
    # U-Net + text encoder in fp32 (about 4 GB); older entries are dropped first.
    max_cache_bytes: int = 6 * 2**30
    # A UNI2-h embedding is 6 kB, so 4096 patches cost 25 MB.
    embedding_cache_entries: int = 4096
    # True for a hosted app: users may name only adapters inside checkpoints/.
    # The process-wide runtime takes it from HISTOLAB_ADAPTERS_ONLY_CHECKPOINTS=1.
    only_checkpoints: bool = False


class AdapterRuntime:
    def __init__(self, config: RuntimeConfig | None = None, paths: Paths | None = None):
        self.config = config or RuntimeConfig()
        self._paths = paths
        self._cache: OrderedDict[tuple[str, str], LoadedAdapter] = OrderedDict()
        self._lock = threading.Lock()
        self.embeddings = EmbeddingCache(self.config.embedding_cache_entries)
        self._encoders: dict[tuple[str, str], object] = {}
        self.loads = 0  # files parsed (cache misses), for tests and benchmarks

    @property
    def paths(self) -> Paths:
        return self._paths or Paths.from_env()

    # ------------------------------------------------------------ loading
    def resolve(self, ref: str | Path) -> Path:
        """A path, a name under checkpoints/, or the ``name`` in an adapter's manifest."""
        text = str(ref).strip()
        if not text:
            raise InvalidRequest("an adapter reference is empty")
        root = self.paths.checkpoints
        candidates = [root / text] if self.config.only_checkpoints else [Path(text).expanduser(), root / text]
        for p in candidates:
            if p.exists():
                if self.config.only_checkpoints and root.resolve() not in p.resolve().parents:
                    break
                return p
        found = find_by_name(root, text)
        if found is not None:
            return found
        raise ModelNotFound(
            f"no adapter {text!r}: it is not a path, and nothing in "
            f"{root} has that name; `python -m histolab adapters` lists what is there"
        )

    def load(self, ref: str | Path) -> LoadedAdapter:
        path = self.resolve(ref)
        loc = locate(path)
        key = loc.cache_key()  # content (and manifest): a copy under another name is not parsed again
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
        if hit is not None:
            fresh = open_located(loc, payload=hit.payload)  # name and path of this copy, the parsed weights shared
            return fresh
        loaded = open_located(loc)
        with self._lock:
            self.loads += 1
            self._cache[key] = loaded
            self._evict()
        return loaded

    def report(self, model, ref: str | Path):
        """What loading ``ref`` into ``model`` does (``LoadReport``): format, modules patched, keys ignored.

        Raises AdapterError, as applying would, when the file does not fit (e.g. none of its keys match).
        """
        from histolab.adapters.report import LoadReport

        a = self.load(ref)
        reporter = getattr(a.payload, "load_report", None)
        if reporter is None:
            a.payload.validate(model, a.name)
            return LoadReport(a.name, a.format)
        return reporter(model, a.name)

    def _evict(self) -> None:
        total = sum(a.payload.nbytes for a in self._cache.values())
        while total > self.config.max_cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            total -= old.payload.nbytes

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()
        self.embeddings.clear()

    # ----------------------------------------------------------- encoders
    def register_encoder(self, encoder, device: str = "cpu") -> None:
        """Use ``encoder`` for its name (tests, or an encoder built by the caller)."""
        self._encoders[(encoder.name, device)] = encoder

    def encoder(self, name: str, device: str = "cpu"):
        key = (name, device)
        if key not in self._encoders:
            try:
                from histolab.encoders import get_encoder
            except ImportError as exc:
                raise ModelNotFound(
                    f"image encoder {name!r} is needed for reference mode, but the encoder registry "
                    f"(histolab.encoders.get_encoder) is not available: {exc}"
                ) from exc
            self._encoders[key] = get_encoder(name, paths=self.paths, device=device)
        return self._encoders[key]

    # ----------------------------------------------------------- applying
    @contextlib.contextmanager
    def applied(self, model, specs: Iterable) -> Iterator[list]:
        from histolab.recipe import AdapterUse

        specs = tuple(specs)
        with model.lock:
            loaded = [self.load(s.ref) for s in specs]
            for a, s in zip(loaded, specs, strict=True):
                strength = float(s.strength)
                if not math.isfinite(strength):
                    raise InvalidRequest(f"adapter {s.ref!r}: strength must be a finite number but is {s.strength}")
                prepare = getattr(a.payload, "prepare", None) or a.payload.validate
                prepare(model, a.name)
                _warn_ignored(a, model)
            _check_together(loaded)
            edit = ModelEdit()
            uses = []
            try:
                for a, s in zip(loaded, specs, strict=True):
                    kw = {"runtime": self} if a.kind == "projector" else {}
                    a.payload.apply(model, float(s.strength), edit, a.name, **kw)
                    uses.append(AdapterUse(a.name, a.kind, float(s.strength), a.hash, self._recorded_path(a.path)))
                for u in uses:
                    model.applied.append(u)
                edit.on_undo(lambda: _remove_uses(model.applied, uses))
            except BaseException:
                edit.undo()
                raise
            try:
                yield uses
            finally:
                edit.undo()

    def _recorded_path(self, path: Path) -> str:
        """Relative to checkpoints/ when inside it, so a recipe still resolves on another machine."""
        root = self.paths.checkpoints.resolve()
        p = path.resolve()
        return p.relative_to(root).as_posix() if root in p.parents else str(p)


def _warn_ignored(a: LoadedAdapter, model) -> None:
    """Keys a file carries that this base has no place for are never dropped silently: a warning lists them."""
    reporter = getattr(a.payload, "load_report", None)
    if reporter is None or a.kind == "dreambooth":  # a checkpoint's EMA/scheduler keys are expected, not news
        return
    rep = reporter(model, a.name)
    if rep.ignored:
        warnings.warn(AdapterWarning(rep.summary()), stacklevel=3)


def _remove_uses(applied: list, uses: list) -> None:
    for u in uses:
        for i in range(len(applied) - 1, -1, -1):
            if applied[i] is u:
                del applied[i]
                break


def _check_together(loaded: list[LoadedAdapter]) -> None:
    projectors = [a.name for a in loaded if a.kind == "projector"]
    if len(projectors) > 1:
        raise AdapterError(f"only one foundation-embedding adapter at a time, got {', '.join(projectors)}")
    seen: dict[str, tuple[int, str]] = {}
    for i, a in enumerate(loaded):
        if a.kind == "textual_inversion":
            for t in a.payload.tokens:
                if t in seen and seen[t][0] != i:
                    raise AdapterError(
                        f"textual inversions {seen[t][1]!r} and {a.name!r} both use the token {t!r}; "
                        "give one another `trigger_token` in its manifest.json"
                    )
                seen[t] = (i, a.name)


_DEFAULT: AdapterRuntime | None = None
_DEFAULT_LOCK = threading.Lock()


def default_runtime() -> AdapterRuntime:
    """The process-wide runtime (caches only; nothing in it belongs to one user)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None:
            only = os.environ.get("HISTOLAB_ADAPTERS_ONLY_CHECKPOINTS", "") in ("1", "true", "yes")
            _DEFAULT = AdapterRuntime(RuntimeConfig(only_checkpoints=only))
        return _DEFAULT


def applied(model, specs, *, runtime: AdapterRuntime | None = None):
    """Context manager: apply ``specs`` (AdapterSpec: ref, strength) to ``model``; yields list[AdapterUse]."""
    return (runtime or default_runtime()).applied(model, specs)


__all__ = ["AdapterRuntime", "Located", "RuntimeConfig", "applied", "default_runtime"]
