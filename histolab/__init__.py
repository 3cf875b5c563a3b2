"""histolab: fine-tune, generate, measure and review synthetic histology."""

from histolab import _torchvision_compat

# transformers, diffusers and timm all import torchvision, which fails on a CPU
# build of torch; this arranges the repair for when that first happens, without
# importing torch now (see histolab/_torchvision_compat.py).
_torchvision_compat.install()

__version__ = "0.1.0"
