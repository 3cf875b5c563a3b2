"""Pathology image encoders (UNI2-h, UNI, the embedded default) and their registry."""

from histolab.encoders.base import ImageEncoder
from histolab.encoders.registry import DEFAULT_ENCODER, ENCODER_NAMES, EncoderInfo, get_encoder, list_encoders

__all__ = ["DEFAULT_ENCODER", "ENCODER_NAMES", "EncoderInfo", "ImageEncoder", "get_encoder", "list_encoders"]
