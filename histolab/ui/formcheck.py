"""The Generate form's checks and notes, without Gradio: seeds, the prompt's token count, trigger tokens,
reference mode's setup, and step progress with an ETA. Every message speaks the page's words (its labels:
"Seed", "Adapter 1", "Reference patch"), never the library's field names; the tab turns them into
``gr.Error`` / ``gr.Warning`` and the status line."""

from __future__ import annotations

import functools
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from histolab.errors import InvalidRequest
from histolab.ui.common import to_int

RANDOM_SEED = -1  # SD-webui's convention: -1 draws a seed
SEED_MAX = 2**32 - 1  # SD-webui's range; a seed typed beyond it is a mistake, not a wish for a bigger one
NO_ADAPTER = "(none)"


# ------------------------------------------------------------------ seeds


def check_seed(value: Any, allow_random: bool = True) -> int:
    """The seed to use: ``value`` itself, or a drawn one for -1. Out of range is an error naming the range."""
    v = to_int("Seed", value)
    if allow_random and v == RANDOM_SEED:
        return secrets.randbelow(SEED_MAX + 1)
    if not 0 <= v <= SEED_MAX:
        rnd = ", or -1 for a random seed" if allow_random else ""
        raise InvalidRequest(
            f"Seed {v} is out of range: use a whole number from 0 to {SEED_MAX} (2^32-1){rnd}. Nothing was generated."
        )
    return v


# ------------------------------------------------------------------ progress


def eta_text(done: int, total: int, elapsed: float, unit: str = "step") -> str:
    """'step 3 of 25, about 4 s left' (the rate so far; none before the first step is done)."""
    text = f"{unit} {done} of {total}"
    if 0 < done < total and elapsed > 0:
        left = elapsed / done * (total - done)
        text += f", about {left:.0f} s left" if left >= 1 else ", under 1 s left"
    return text


class StepProgress:
    """The engine's ``(done, total)`` callback as ``report(fraction, text)`` calls with an ETA.

    The clock starts when the object is made (just before the run), so the first
    step's share of set-up is in the rate: the ETA errs long, not short.
    """

    def __init__(self, report: Callable[[float, str], None], unit: str = "step", clock=time.monotonic):
        self._report, self._unit, self._clock = report, unit, clock
        self._t0 = clock()

    def __call__(self, done: int, total: int) -> None:
        self._report(done / total if total else 0.0, eta_text(done, total, self._clock() - self._t0, self._unit))


# ------------------------------------------------------------------ prompt tokens


@functools.lru_cache(maxsize=4)
def _tokenizer_from(folder: str):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def tokenizer_for(source: str):
    """The tokenizer a base's text encoder reads prompts with, from files only (never loads the model):
    the embedded default's own vocabulary, a diffusers folder's tokenizer/, else CLIP's (SD 1.5's)."""
    from histolab.clip_tokenizer import project_tokenizer_dir
    from histolab.config import EMBEDDED_BASE_ID

    if source == EMBEDDED_BASE_ID:
        return _tokenizer_from(str(project_tokenizer_dir()))
    folder = Path(source) / "tokenizer"
    if (folder / "vocab.json").is_file():
        return _tokenizer_from(str(folder))
    return _clip()


@functools.lru_cache(maxsize=1)
def _clip():
    from histolab.clip_tokenizer import CLIP_VOCAB_SIZE, tokenizer_for_vocab_size

    return tokenizer_for_vocab_size(CLIP_VOCAB_SIZE)


def token_pattern(token: str) -> re.Pattern:
    """How the engine finds a trigger token in a prompt (histolab.adapters.textual_inversion)."""
    return re.compile(r"(?<![\w<>])" + re.escape(token) + r"(?![\w<>])")


@dataclass(frozen=True)
class TokenCount:
    count: int
    limit: int
    cut: str  # the words CLIP drops ('' when the prompt fits)

    @property
    def over(self) -> bool:
        return self.count > self.limit

    def text(self) -> str:
        if not self.over:
            return f"{self.count}/{self.limit} tokens"
        return (
            f"⚠ {self.count}/{self.limit} tokens: CLIP reads only the first {self.limit}, "
            f"so the last {self.count - self.limit} are cut (from “{self.cut}”). Shorten the prompt."
        )


def count_tokens(tokenizer, prompt: str, vectors: dict[str, int] | None = None) -> TokenCount:
    """The prompt's tokens as the text encoder sees them: each trigger token of a textual inversion counts
    as its number of vectors (the engine expands it so), everything else as the tokenizer splits it."""
    limit = int(tokenizer.model_max_length) - 2  # CLIP's 77 minus the start and end tokens
    text, extra = str(prompt or ""), []
    for token, n in (vectors or {}).items():
        text, k = token_pattern(token).subn(" ", text)
        extra += [token] * (k * n)
    ids = tokenizer(text, truncation=False, add_special_tokens=False)["input_ids"]
    count = len(ids) + len(extra)
    cut = ""
    if count > limit:
        # The words past the limit, named from the plain text's end (a trigger's place is not tracked).
        cut = tokenizer.decode(ids[max(0, len(ids) - (count - limit)) :]).strip()
    return TokenCount(count, limit, cut)


# ------------------------------------------------------------------ trigger tokens


@dataclass(frozen=True)
class Chosen:
    """An adapter chosen in a slot: the page's slot number (1-based), its name, kind and trigger tokens."""

    slot: int
    label: str
    kind: str
    tokens: tuple[str, ...]
    strength: float = 1.0


def ti_vectors(path: str) -> dict[str, int]:
    """A textual inversion's trigger tokens and how many vectors (prompt tokens) each stands for."""
    from histolab.adapters import default_runtime

    a = default_runtime().load(path)
    if a.kind != "textual_inversion":
        return {}
    return {e.token: int(e.vectors.shape[0]) for e in a.payload.embeddings}


def has_token(text: str, token: str) -> bool:
    return bool(token_pattern(token).search(text or ""))


def missing_trigger_warnings(prompt: str, negative: str, chosen: list[Chosen]) -> list[str]:
    """A warning per textual inversion applied (strength not 0) whose tokens appear in neither prompt box:
    its vectors are then never looked up, so it changes nothing."""
    out = []
    for c in chosen:
        if c.kind != "textual_inversion" or not c.tokens or c.strength == 0:
            continue
        if not any(has_token(prompt, t) or has_token(negative, t) for t in c.tokens):
            listed = ", ".join(c.tokens)
            out.append(
                f"Adapter {c.slot} ({c.label}) is a textual inversion, but none of its tokens ({listed}) is in the "
                "prompt, so it changes nothing. Click a token under the adapters to add it."
            )
    return out


def insert_token(prompt: str, token: str) -> str:
    """The prompt with ``token`` added at its end (once: a token already there is not added again)."""
    prompt = str(prompt or "")
    if not token or has_token(prompt, token):
        return prompt
    body = prompt.rstrip()
    if not body:
        return token
    return f"{body}, {token}" if not body.endswith(",") else f"{body} {token}"


# ------------------------------------------------------------------ reference mode


@dataclass(frozen=True)
class ReferenceSetup:
    """What choosing reference mode does to the form: slot values, the settings applied, and the note."""

    slots: list[str]
    settings: dict[str, Any]  # steps / guidance / scheduler to set (only those recommended)
    note: str


def reference_setup(
    slots: list[str], projectors: list[tuple[str, str]], max_steps: int, recommended: Callable[[str], dict]
) -> ReferenceSetup:
    """``slots``: the adapter names chosen now; ``projectors``: (name, path) of the usable projector adapters;
    ``recommended(path)``: an adapter's recommended settings (histolab.adapters.recommended)."""
    slots = list(slots)
    chosen = [(i, s) for i, s in enumerate(slots) if s in {n for n, _ in projectors}]
    notes = []
    if not chosen:
        if len(projectors) != 1:
            names = ", ".join(n for n, _ in projectors)
            return ReferenceSetup(slots, {}, reference_problem(slots, projectors) or f"Choose one of {names}.")
        free = next((i for i, s in enumerate(slots) if s in ("", None, NO_ADAPTER)), 0)
        slots[free] = projectors[0][0]
        chosen = [(free, projectors[0][0])]
        notes.append(f"{projectors[0][0]} chosen in Adapter {free + 1} (the only projector here).")
    name = chosen[0][1]
    path = dict(projectors)[name]
    rec = recommended(path)
    settings: dict[str, Any] = {}
    parts = []
    if "guidance_scale" in rec:
        settings["guidance"] = float(rec["guidance_scale"])
        parts.append(f"guidance {settings['guidance']:g}")
    if "scheduler" in rec:
        settings["scheduler"] = str(rec["scheduler"])
        parts.append(f"sampler {settings['scheduler']}")
    if "steps" in rec:
        want = int(rec["steps"])
        settings["steps"] = min(want, max_steps)
        parts.append(
            f"{want} steps"
            if want <= max_steps
            else f"{max_steps} steps (it recommends {want}; this app allows {max_steps})"
        )
    if parts:
        notes.append(f"Recommended settings of {name} applied: {', '.join(parts)}.")
    notes.append("The prompt boxes are not used in reference mode.")
    return ReferenceSetup(slots, settings, " ".join(notes))


def reference_problem(slots: list[str], projectors: list[tuple[str, str]]) -> str:
    """Why a reference-mode run cannot start, in the page's words ('' when a projector is chosen)."""
    names = [n for n, _ in projectors]
    if any(s in names for s in slots):
        return ""
    if not names:
        return (
            "reference mode needs a foundation-embedding adapter (a projector), and there is none in checkpoints/ "
            "here: train one on the Train tab (method projector) or copy one into checkpoints/."
        )
    free = next((i for i, s in enumerate(slots) if s in ("", None, NO_ADAPTER)), 0)
    if len(names) == 1:
        return f"reference mode needs a projector adapter: choose {names[0]} in Adapter {free + 1}."
    return f"reference mode needs a projector adapter: choose one of {', '.join(names)} in Adapter {free + 1}."
