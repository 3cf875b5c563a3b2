"""histolab: fine-tune, generate, measure and review synthetic histology."""

from histolab._torchvision_compat import ensure_torchvision_importable

# Must run before anything imports transformers, diffusers or timm: all three
# import torchvision, which fails on a CPU build of torch without this.
ensure_torchvision_importable()

__version__ = "0.1.0"
