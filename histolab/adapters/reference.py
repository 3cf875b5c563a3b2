"""Reference-patch mode: the conditioner a foundation-embedding adapter registers.

``model.conditioners["reference"](model, request, n)`` encodes
``request.reference`` with the adapter's image encoder (through the encoder's
own transform), projects the embedding to conditioning tokens, and returns
``(cond, uncond, reference_hash, encoder_name)``: ``cond`` the patch's tokens
repeated ``n`` times, ``uncond`` the projected null embedding. The engine runs
classifier-free guidance on them, ``eps = eps_null + w * (eps_cond - eps_null)``.

Embeddings are cached by the patch's pixel content (and the encoder's
weights), so generating again from the same patch does not encode it again.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from histolab.errors import AdapterError, InvalidRequest


def as_rgb_image(reference):
    """A PIL RGB image from a PIL image, a path or PNG/JPEG bytes."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(reference, Image.Image):
        img = reference
    elif isinstance(reference, (str, Path, bytes)):
        try:
            img = Image.open(io.BytesIO(reference) if isinstance(reference, bytes) else reference)
            img.load()
        except (OSError, UnidentifiedImageError) as exc:
            raise InvalidRequest(f"the reference patch is not a readable image: {exc}") from exc
    else:
        raise InvalidRequest(f"the reference patch must be an image, not {type(reference).__name__}")
    return img if img.mode == "RGB" else img.convert("RGB")


def image_digest(image) -> str:
    """sha256 of an image's pixels (and size): the same patch gives the same digest from any file format."""
    img = as_rgb_image(image)
    h = hashlib.sha256(f"RGB:{img.width}x{img.height}:".encode())
    h.update(img.tobytes())
    return h.hexdigest()


class EmbeddingCache:
    """LRU cache of encoder embeddings, keyed by (encoder name, encoder weights hash, image digest)."""

    def __init__(self, max_entries: int = 1024):
        self.max_entries = max_entries
        self._items: OrderedDict[tuple[str, str, str], Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def get_or_compute(self, key: tuple[str, str, str], compute: Callable[[], Any]):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
        value = compute()  # outside the lock: encoding is slow and other keys may be served meanwhile
        with self._lock:
            self.misses += 1
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)
        return value


class ReferenceConditioner:
    def __init__(self, adapter, runtime, name: str):
        # The runtime (encoders, embedding cache) is handed in by whoever applies the adapter,
        # never looked up from here: runtime.py imports this module.
        if runtime is None:
            raise AdapterError(
                f"{name}: a reference-mode adapter needs the adapter runtime that applies it; "
                "apply it through histolab.adapters.applied(model, specs)"
            )
        self.adapter = adapter
        self.runtime = runtime
        self.name = name

    def encoder(self, model):
        want = self.adapter.encoder
        enc = self.runtime.encoder(want["name"], device=str(model.device))
        if int(enc.dim) != self.adapter.config.encoder_dim:
            raise AdapterError(
                f"{self.name}: the projector takes {self.adapter.config.encoder_dim}-d embeddings but encoder "
                f"{enc.name!r} gives {enc.dim}-d ones"
            )
        if want.get("weights_hash") and enc.weights_hash != want["weights_hash"]:
            raise AdapterError(
                f"{self.name}: trained with encoder {want['name']!r} weights {want['weights_hash'][:10]}, "
                f"but the loaded {enc.name!r} has weights {str(enc.weights_hash)[:10]}; "
                "use the same encoder weights the adapter was trained with"
            )
        return enc

    def embedding(self, model, reference):
        import torch

        enc = self.encoder(model)
        image = as_rgb_image(reference)
        digest = image_digest(image)

        def compute():
            out = enc.encode([image])
            t = torch.as_tensor(out)
            if t.ndim != 2 or t.shape[0] != 1 or t.shape[1] != self.adapter.config.encoder_dim:
                raise AdapterError(f"encoder {enc.name!r} returned shape {list(t.shape)} for one image")
            return t[0].detach().float().cpu()

        emb = self.runtime.embeddings.get_or_compute((enc.name, str(enc.weights_hash), digest), compute)
        return emb, digest, enc.name

    def __call__(self, model, request, n: int):
        emb, digest, encoder_name = self.embedding(model, request.reference)
        cond = self.adapter.project(emb[None], model).expand(n, -1, -1).contiguous()
        uncond = self.adapter.null_tokens(model).expand(n, -1, -1).contiguous()
        return cond, uncond, digest, encoder_name
