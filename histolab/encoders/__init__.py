"""Pathology image encoders (UNI2-h, UNI, the embedded default) and their registry."""

from histolab.encoders.base import ImageEncoder

__all__ = ["ImageEncoder"]
