"""Base models with random weights, for tests and benchmarks.

Tests use the TINY architecture (fast, seeded, deterministic); benchmarks use
SD15's shapes, which time the same as trained SD 1.5 weights.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

from histolab.embedded.architecture import ARCHITECTURES, Architecture, build_components


@functools.lru_cache(maxsize=1)
def tokenizer_dir() -> Path:
    """A CLIP-format tokenizer built once per process from the project's corpus."""
    from histolab.embedded.tokenizer_build import build

    return build(Path(tempfile.mkdtemp(prefix="histolab-tok-")))


def random_base(arch: str | Architecture = "tiny", seed: int = 0, device: str = "cpu", dtype=None):
    """A ``BaseModel`` of the given architecture with seeded random weights."""
    import torch
    from transformers import CLIPTokenizer

    from histolab.base_model import assemble

    arch = ARCHITECTURES[arch] if isinstance(arch, str) else arch
    vae, unet, te = build_components(arch, seed)
    if arch.name != "sd15":
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir())
    else:
        # SD 1.5's real vocabulary is not available offline; any CLIP-format
        # tokenizer gives the same shapes and timings (ids stay < vocab size).
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir())
    return assemble(
        f"random-{arch.name}-{seed}",
        f"random-{arch.name}-{seed}".encode().hex().ljust(64, "0")[:64],
        vae,
        unet,
        te,
        tokenizer,
        dict(arch.scheduler),
        device,
        dtype or torch.float32,
    )
