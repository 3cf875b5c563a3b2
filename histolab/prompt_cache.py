"""Text embeddings of recent prompts, so a repeated prompt skips the text encoder.

A demo's visitors mostly re-run the example prompts and the empty negative
prompt; each costs one CLIP text-encoder pass otherwise. A hit returns the very
tensor the encoder gave (same bits), so images do not change.

The key holds everything that changes what the encoder computes: the prompt,
the adapters applied to the model right now (textual inversion adds tokens,
LoRA and DreamBooth change weights: each listed with kind, hash and strength),
the tokenizer's vocabulary size, the device and dtype, and the identity and
in-place version counter of every text-encoder parameter (an edit made outside
the adapter runtime bumps them; a few hundred integers, read in microseconds).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

MAX_PROMPTS = 64  # a (77, 768) float32 embedding is 236 kB: 64 of them are 15 MB


class PromptCache:
    def __init__(self, max_prompts: int = MAX_PROMPTS):
        self.max_prompts = max_prompts
        self._items: OrderedDict[tuple, Any] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def key(self, model, prompt: str) -> tuple:
        te = model.text_encoder
        params = tuple((id(p), p._version) for p in te.parameters())
        adapters = tuple((u.kind, u.hash, float(u.strength)) for u in model.applied)
        return (prompt, adapters, len(model.tokenizer), str(model.device), str(model.dtype), id(te), params)

    def get(self, model, prompt: str, encode):
        """The embedding of ``prompt`` (1, tokens, dim): cached, or ``encode([prompt])`` stored."""
        k = self.key(model, prompt)
        hit = self._items.get(k)
        if hit is not None:
            self._items.move_to_end(k)
            self.hits += 1
            return hit
        self.misses += 1
        value = encode([prompt])
        self._items[k] = value
        while len(self._items) > self.max_prompts:
            self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)
