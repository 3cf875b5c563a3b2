"""Textual inversion: new tokens whose embedding vectors were learned.

Files read (by content):

* SD-webui ``.pt``: ``{"string_to_param": {"*": tensor(n, dim)}, "string_to_token": ..., "name": ...}``,
  opened with ``torch.load(weights_only=True)``; the token is the file's stem, as in SD-webui;
* SD-webui ``.safetensors``: ``{"emb_params": tensor(n, dim)}``; token from the file's stem;
* diffusers ``learned_embeds.safetensors`` / ``.bin``: ``{token: tensor(dim) or (n, dim)}``.

A manifest's ``trigger_token`` overrides the token. An embedding of ``n``
vectors adds tokens ``t, t_1, ..., t_{n-1}`` (diffusers' convention) and the
prompt's ``t`` is expanded to all of them.

Applying never edits the base tokenizer or the base embedding table: the model
gets a copy of the tokenizer with the new tokens (cached) and an embedding
module that looks new ids up in a small extra table; removing puts the
original tokenizer and embedding module back.
"""

from __future__ import annotations

import copy
import re
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from histolab.adapters.edit import ModelEdit
from histolab.adapters.report import LoadReport
from histolab.errors import AdapterError

WEIGHTS_NAME = "learned_embeds.safetensors"
MAX_VECTORS = 75  # CLIP's 77 tokens minus BOS and EOS
FORMAT_NAMES = {
    "sd-webui-pt": "SD-webui embedding (.pt, string_to_param)",
    "sd-webui-safetensors": "SD-webui embedding (.safetensors, emb_params)",
    "diffusers": "diffusers learned_embeds ({token: vectors})",
}


@dataclass
class Embedding:
    token: str
    vectors: Any  # (n, dim) float

    @property
    def tokens(self) -> list[str]:
        return [self.token] + [f"{self.token}_{i}" for i in range(1, int(self.vectors.shape[0]))]


@dataclass
class TextualInversion:
    embeddings: list[Embedding]
    format: str  # "sd-webui-pt", "sd-webui-safetensors", "diffusers"
    info: dict[str, Any] = field(default_factory=dict)  # SD-webui's name, step, sd_checkpoint(_name)

    kind = "textual_inversion"

    @property
    def nbytes(self) -> int:
        return sum(e.vectors.element_size() * e.vectors.nelement() for e in self.embeddings)

    @property
    def tokens(self) -> list[str]:
        return [t for e in self.embeddings for t in e.tokens]

    def load_report(self, model, name: str = "textual inversion") -> LoadReport:
        self.validate(model, name)
        fmt = FORMAT_NAMES.get(self.format, self.format)
        # One module patched: the token embedding, extended by the new rows.
        return LoadReport(name=name, format=fmt, text_encoder_modules=1, tokens=tuple(self.tokens))

    def validate(self, model, name: str = "textual inversion") -> None:
        emb = model.text_encoder.get_input_embeddings()
        width = int(emb.embedding_dim)
        for e in self.embeddings:
            if int(e.vectors.shape[1]) != width:
                raise AdapterError(
                    f"{name}: embedding {e.token!r} has vectors of width {int(e.vectors.shape[1])}, "
                    f"the base text encoder's tokens have width {width} "
                    f"({_width_hint(int(e.vectors.shape[1]))})"
                )
        tok = _base_tokenizer(model.tokenizer)
        vocab = tok.get_vocab()
        added = set(_added_tokens(model.tokenizer))
        for t in self.tokens:
            if t in added:
                raise AdapterError(
                    f"{name}: the token {t!r} is already added by another textual inversion applied with it; "
                    "give one of them another `trigger_token` in its manifest.json"
                )
            for form in (t, t + "</w>"):
                if form in vocab:
                    raise AdapterError(
                        f"{name}: the token {t!r} already exists in the tokenizer ({form!r}, id {vocab[form]}); "
                        "adding it would change what that word means. Set another `trigger_token` "
                        "(e.g. '<" + t.strip("<>") + ">') in the adapter's manifest.json"
                    )

    def apply(self, model, strength: float, edit: ModelEdit, name: str = "textual inversion") -> None:
        self.validate(model, name)
        if strength == 0:
            return
        current = model.tokenizer
        base_tok = _base_tokenizer(current)
        previous = list(current.expansions.items()) if isinstance(current, EmbeddingTokenizer) else []
        new = [(e.token, e.tokens) for e in self.embeddings]
        expansions = dict(previous + [(tok, " ".join(ts)) for tok, ts in new])
        all_tokens = [t for _, ts in previous for t in ts.split(" ")] + [t for _, ts in new for t in ts]
        inner = _extended_tokenizer(base_tok, tuple(all_tokens))
        edit.set_attr(model, "tokenizer", EmbeddingTokenizer(base_tok, inner, expansions))

        te = model.text_encoder
        current_emb = te.get_input_embeddings()
        base_emb = current_emb.base if isinstance(current_emb, ExtendedEmbedding) else current_emb
        # New ids start after the tokenizer's vocabulary; that is the table's end for SD 1.5
        # (49408 both), and earlier when a tokenizer uses fewer ids than its text encoder has rows.
        start = len(base_tok)
        ids = inner.convert_tokens_to_ids(all_tokens)
        if ids != list(range(start, start + len(all_tokens))) or start > base_emb.num_embeddings:
            raise AdapterError(
                f"{name}: the tokenizer gave the new tokens ids {ids[:4]}..., not the ids after its vocabulary of "
                f"{start}, or its vocabulary is larger than the text encoder's {base_emb.num_embeddings} rows"
            )
        with torch.no_grad():
            rows = [e.vectors.to(base_emb.weight.device, base_emb.weight.dtype) * strength for e in self.embeddings]
            extra = torch.cat(([current_emb.extra] if isinstance(current_emb, ExtendedEmbedding) else []) + rows)
        te.set_input_embeddings(ExtendedEmbedding(base_emb, extra, start))
        edit.on_undo(lambda: te.set_input_embeddings(current_emb))


def _width_hint(width: int) -> str:
    return {768: "an SD 1.x embedding", 1024: "an SD 2.x embedding", 1280: "an SDXL embedding"}.get(
        width, "made for another base model"
    )


class EmbeddingTokenizer:
    """A tokenizer that expands each trigger token to its n vector tokens, then tokenizes as ``inner`` does."""

    def __init__(self, base, inner, expansions: dict[str, str]):
        self.base = base
        self.inner = inner
        self.expansions = expansions
        self._patterns = [
            (re.compile(r"(?<![\w<>])" + re.escape(tok) + r"(?![\w<>])"), repl) for tok, repl in expansions.items()
        ]

    def expand(self, text: str) -> str:
        for pattern, repl in self._patterns:
            text = pattern.sub(lambda _m, r=repl: r, text)
        return text

    def _expand_any(self, text):
        return self.expand(text) if isinstance(text, str) else [self.expand(t) for t in text]

    def __call__(self, text, *args, **kwargs):
        return self.inner(self._expand_any(text), *args, **kwargs)

    def encode(self, text, *args, **kwargs):
        return self.inner.encode(self._expand_any(text), *args, **kwargs)

    def tokenize(self, text, *args, **kwargs):
        return self.inner.tokenize(self._expand_any(text), *args, **kwargs)

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def _base_tokenizer(tok):
    return tok.base if isinstance(tok, EmbeddingTokenizer) else tok


def _added_tokens(tok) -> list[str]:
    if not isinstance(tok, EmbeddingTokenizer):
        return []
    return [t for ts in tok.expansions.values() for t in ts.split(" ")]


# Copies of a base tokenizer with tokens added, per base tokenizer and token tuple:
# copying SD 1.5's 49k-token tokenizer costs tens of ms, and the same
# embeddings are applied request after request. Copies are never mutated.
_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TOKENIZERS_LOCK = threading.Lock()
_TOKENIZERS_PER_BASE = 16


def _extended_tokenizer(base, tokens: tuple[str, ...]):
    from tokenizers import AddedToken

    with _TOKENIZERS_LOCK:
        per = _TOKENIZERS.setdefault(base, {})
        if tokens in per:
            return per[tokens]
    tok = copy.deepcopy(base)
    # normalized=False: matched on the raw prompt text, before CLIP's lower-casing,
    # exactly as the token is written (a trigger like '<SKS>' stays whole).
    tok.add_tokens([AddedToken(t, normalized=False, single_word=False) for t in tokens])
    with _TOKENIZERS_LOCK:
        if len(per) >= _TOKENIZERS_PER_BASE:
            per.pop(next(iter(per)))
        per[tokens] = tok
    return tok


class ExtendedEmbedding(torch.nn.Module):
    """The base token table plus rows for added tokens; the base table is shared, not copied."""

    def __init__(self, base, extra, start: int):
        super().__init__()
        self.base = base
        self.start = start  # the first added id
        self.register_buffer("extra", extra, persistent=False)
        self.num_embeddings = max(base.num_embeddings, start + int(extra.shape[0]))
        self.embedding_dim = base.embedding_dim

    @property
    def weight(self):
        return self.base.weight

    def forward(self, ids):
        new = ids >= self.start
        out = self.base(ids.clamp(max=self.base.num_embeddings - 1))
        if bool(new.any()):
            rows = self.extra[(ids - self.start).clamp(min=0, max=self.extra.shape[0] - 1)]
            out = torch.where(new[..., None], rows.to(out.dtype), out)
        return out


# ------------------------------------------------------------------ parsing


def is_ti_state(obj: dict) -> bool:
    if "string_to_param" in obj or "emb_params" in obj or ("clip_l" in obj and "clip_g" in obj):
        return True
    # diffusers: a few {token: vector(s)} entries, no module-path keys
    return (
        0 < len(obj) <= 16
        and all(isinstance(k, str) and not k.endswith((".weight", ".bias", ".alpha")) for k in obj)
        and all(isinstance(v, torch.Tensor) and v.ndim in (1, 2) and v.is_floating_point() for v in obj.values())
    )


def from_state(obj: dict, token: str, where: str) -> TextualInversion:
    """``token``: the manifest's trigger token, else the file's stem (SD-webui names embeddings by file)."""
    if "clip_l" in obj and "clip_g" in obj:
        raise AdapterError(
            f"{where}: an SDXL embedding (clip_l + clip_g vectors); it does not fit an SD-1.5-family model"
        )
    if "string_to_param" in obj:
        params = obj["string_to_param"]
        if not isinstance(params, dict) or not params:
            raise AdapterError(f"{where}: `string_to_param` is not a non-empty dict")
        vec = next(iter(params.values()))
        info = {
            k: obj[k]
            for k in ("name", "step", "sd_checkpoint", "sd_checkpoint_name")
            if isinstance(obj.get(k), (str, int))
        }
        return TextualInversion([_embedding(token, vec, where)], "sd-webui-pt", info)
    if "emb_params" in obj:
        return TextualInversion([_embedding(token, obj["emb_params"], where)], "sd-webui-safetensors")
    items = [(k, v) for k, v in obj.items() if isinstance(v, torch.Tensor)]
    if len(items) == 1 and token:
        return TextualInversion([_embedding(token, items[0][1], where)], "diffusers")
    return TextualInversion([_embedding(k, v, where) for k, v in items], "diffusers")


def _embedding(token: str, vec, where: str) -> Embedding:
    if not isinstance(vec, torch.Tensor) or not vec.is_floating_point():
        raise AdapterError(f"{where}: the embedding for {token!r} is not a float tensor")
    if vec.ndim == 1:
        vec = vec[None]
    if vec.ndim != 2 or vec.shape[0] < 1:
        raise AdapterError(f"{where}: the embedding for {token!r} must have shape (n, width) but has {list(vec.shape)}")
    if vec.shape[0] > MAX_VECTORS:
        raise AdapterError(f"{where}: {token!r} has {vec.shape[0]} vectors; a prompt holds at most {MAX_VECTORS}")
    if not token or any(c.isspace() for c in token):
        raise AdapterError(f"{where}: the trigger token {token!r} must be one word without spaces")
    return Embedding(token, vec.detach().float().contiguous())


def save(folder: str | Path, token: str, vectors, manifest) -> Path:
    """Our format: diffusers' ``learned_embeds.safetensors`` ({token: (n, width)}) + manifest with the token."""
    from safetensors.torch import save_file

    from histolab.adapters.manifest import write_manifest

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / (manifest.weights or WEIGHTS_NAME)
    save_file({token: vectors.detach().float().contiguous().cpu()}, str(out))
    manifest.weights = out.name
    manifest.trigger_token = token
    manifest.config.setdefault("vectors", int(vectors.shape[0]) if vectors.ndim == 2 else 1)
    write_manifest(folder, manifest)
    return out
