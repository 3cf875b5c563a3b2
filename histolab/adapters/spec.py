"""What a request asks of an adapter: a path or registry name and a strength.

Its own light module (no torch) so that the generation engine, which takes specs in its
requests, and the adapters package, which applies them, both import it from below.
"""

from __future__ import annotations

from dataclasses import dataclass

from histolab.errors import InvalidRequest


@dataclass(frozen=True)
class AdapterSpec:
    """An adapter to apply for one request: a path or registry name, and a strength."""

    ref: str
    strength: float = 1.0


def parse_spec(text: str) -> AdapterSpec:
    """``PATH[:STRENGTH]`` -> AdapterSpec. The strength is the part after the last ':' when it is a number."""
    text = text.strip()
    ref, sep, tail = text.rpartition(":")
    if sep and ref and tail:
        try:
            return AdapterSpec(ref, float(tail))
        except ValueError:
            pass  # a ':' that is part of the path (e.g. C:\\...)
    if not text:
        raise InvalidRequest("an --adapter value is empty; give PATH or PATH:STRENGTH")
    return AdapterSpec(text, 1.0)
