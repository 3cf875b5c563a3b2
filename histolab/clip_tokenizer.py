"""Tokenizers for base models that come without one (single-file checkpoints).

A single-file checkpoint (SD-webui, kohya, civitai) holds the networks but not
the tokenizer. Which tokenizer fits is decided by the text encoder's vocabulary
size, read from the checkpoint itself:

* 49,408 tokens: OpenAI CLIP's BPE vocabulary, the one SD 1.x was trained with.
  Its merges are vendored in ``histolab/vendor/clip_bpe/`` (MIT, see
  ATTRIBUTION.md there) and ``vocab.json`` is derived from them exactly as CLIP
  does: 256 byte symbols, the same 256 with ``</w>``, one token per merge, then
  ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).
* 1,280 tokens: the project's own vocabulary (histolab/embedded/tokenizer_build.py),
  used by the embedded default and the tiny test architecture.
"""

from __future__ import annotations

import functools
import gzip
import json
import tempfile
from pathlib import Path

from histolab.config import EMBEDDED_BASE_DIR, PACKAGE_ROOT
from histolab.errors import ModelNotFound

CLIP_MERGES_FILE = PACKAGE_ROOT / "vendor" / "clip_bpe" / "merges_48894.txt.gz"
CLIP_VOCAB_SIZE = 49408
PROJECT_VOCAB_SIZE = 1280

_SPECIAL = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    # SD 1.5's tokenizer pads with <|endoftext|> (id 49407), not CLIP's pad id 1.
    "pad_token": "<|endoftext|>",
}


def write_clip_tokenizer(out_dir: str | Path) -> Path:
    """Write CLIP's vocab.json, merges.txt and tokenizer config into ``out_dir``."""
    from histolab.embedded.tokenizer_build import bytes_to_unicode

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = gzip.decompress(CLIP_MERGES_FILE.read_bytes()).decode("utf-8")
    lines = text.split("\n")
    if not lines[0].startswith("#version"):
        raise ModelNotFound(f"{CLIP_MERGES_FILE} does not start with a '#version' header; restore it from git")
    merges = [ln.split() for ln in lines[1:] if ln]
    base = list(bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    if len(tokens) != CLIP_VOCAB_SIZE or len(set(tokens)) != CLIP_VOCAB_SIZE:
        raise ModelNotFound(
            f"{CLIP_MERGES_FILE} gives {len(tokens)} tokens ({len(set(tokens))} distinct), "
            f"not CLIP's {CLIP_VOCAB_SIZE}; restore it from git"
        )
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (out / "merges.txt").write_text(text)
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **_SPECIAL}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(_SPECIAL, indent=2))
    return out


@functools.lru_cache(maxsize=1)
def clip_tokenizer_dir() -> Path:
    """CLIP's tokenizer files, written once per process into a temporary folder."""
    return write_clip_tokenizer(Path(tempfile.mkdtemp(prefix="histolab-clip-tok-")))


def project_tokenizer_dir() -> Path:
    """The project's vocabulary: the embedded base's own copy, else built from the corpus."""
    shipped = EMBEDDED_BASE_DIR / "tokenizer"
    if (shipped / "vocab.json").exists() and (shipped / "merges.txt").exists():
        return shipped
    from histolab.embedded.random_init import tokenizer_dir

    return tokenizer_dir()


def tokenizer_for_vocab_size(vocab_size: int):
    """A ``CLIPTokenizer`` whose vocabulary has exactly ``vocab_size`` tokens."""
    from transformers import CLIPTokenizer

    if vocab_size == CLIP_VOCAB_SIZE:
        folder = clip_tokenizer_dir()
    elif vocab_size == PROJECT_VOCAB_SIZE:
        folder = project_tokenizer_dir()
    else:
        raise ModelNotFound(
            f"no tokenizer for a text encoder with {vocab_size} tokens: histolab has CLIP's ({CLIP_VOCAB_SIZE}) "
            f"and its own ({PROJECT_VOCAB_SIZE}); convert the model to a diffusers folder with its tokenizer/ "
            "and load the folder instead"
        )
    tok = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    if len(tok) != vocab_size:
        raise ModelNotFound(f"the tokenizer in {folder} has {len(tok)} tokens, the text encoder {vocab_size}")
    return tok
