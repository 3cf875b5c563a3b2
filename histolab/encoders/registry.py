"""The encoder registry: names -> loaded encoders.

``get_encoder(name)`` loads and returns a fresh encoder; callers that encode
often keep the instance (nothing is cached here, so no model is shared between
users behind their backs).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from histolab.config import Paths
from histolab.encoders.base import ImageEncoder
from histolab.errors import InvalidRequest

DEFAULT_ENCODER = "embedded"
ENCODER_NAMES = ("embedded", "uni2-h", "uni")


@dataclass(frozen=True)
class EncoderInfo:
    name: str
    dim: int
    description: str
    weights: str  # where the weights are (or must be put)
    available: bool  # weights present on this machine (the hub is not asked)
    default: bool


def _canonical(name: str) -> str:
    key = name.strip().lower().replace("_", "-")
    aliases = {"uni2h": "uni2-h", "uni2": "uni2-h", "uni-2-h": "uni2-h", "default": DEFAULT_ENCODER, "uni-v1": "uni"}
    key = aliases.get(key, key)
    if key not in ENCODER_NAMES:
        raise InvalidRequest(f"unknown encoder {name!r}: choose one of {', '.join(ENCODER_NAMES)}")
    return key


def get_encoder(
    name: str = DEFAULT_ENCODER,
    *,
    paths: Paths | None = None,
    device: str = "cpu",
    weights: str | Path | None = None,
    allow_hub: bool = True,
) -> ImageEncoder:
    """Load encoder ``name`` ("embedded", "uni2-h" or "uni") on ``device``.

    ``weights``: an explicit weights file (judged by content) instead of the
    usual place; ``allow_hub``: whether UNI/UNI2-h may be fetched from the hub
    when no local file exists. Raises OfflineError (with the path to put the
    file at) when the weights cannot be had, UnsafeFile when the file does not
    fit the architecture.
    """
    key = _canonical(name)
    paths = paths if paths is not None else Paths.from_env()
    if key == "embedded":
        from histolab.encoders.embedded import load_embedded_encoder

        return load_embedded_encoder(weights, device)
    from histolab.encoders.uni import SPECS, load_timm_encoder

    return load_timm_encoder(SPECS[key], paths=paths, device=device, weights=weights, allow_hub=allow_hub)


def list_encoders(paths: Paths | None = None) -> list[EncoderInfo]:
    """Every registered encoder, the default first, with where its weights are."""
    from histolab.encoders.embedded import EMBEDDED_ENCODER_DIR, WEIGHTS_FILE
    from histolab.encoders.embedded_net import EMBED_DIM
    from histolab.encoders.uni import SPECS, find_local

    paths = paths if paths is not None else Paths.from_env()
    emb = EMBEDDED_ENCODER_DIR / WEIGHTS_FILE
    out = [
        EncoderInfo(
            "embedded",
            EMBED_DIM,
            "histolab's own small CNN, self-supervised (SimCLR) on the bundled tissue; 64 px input, 256-d",
            str(emb),
            emb.is_file(),
            True,
        )
    ]
    for spec in SPECS.values():
        local = find_local(spec, paths)
        where = local if local is not None else spec.local_dir(paths) / spec.hub_filename
        out.append(EncoderInfo(spec.name, spec.dim, spec.description, str(where), local is not None, False))
    return out
