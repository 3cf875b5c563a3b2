"""Make ``import torchvision`` work on a CPU-only torch.

PyPI's torchvision wheels are linked against CUDA builds of torch. On a CPU
build (``torch==2.13.0+cpu``, which is what this project pins) its compiled
extension ``torchvision/_C.so`` cannot load, and ``torchvision/__init__``
then dies in ``_meta_registrations`` while registering a fake kernel for
``torchvision::nms``, an operator that only the extension would have defined.
transformers, diffusers (through peft) and timm all import torchvision, so
without this nothing imports.

The fix is the smallest one that uses torch's own extension point: when, and
only when, torchvision fails with that error, define the schemas of the two
operators that ``_meta_registrations`` registers unconditionally (``nms`` and
``qnms``) and import again. The pure-Python parts of torchvision (transforms,
model definitions) then work, which is all histolab and timm need; the
compiled ops (nms, roi_align, ...) still raise torchvision's own "Couldn't load
custom C++ ops" error if called. On a normal install, where torchvision
imports, this module does nothing.
"""

from __future__ import annotations

import importlib
import sys

_NMS_SCHEMA = "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
_QNMS_SCHEMA = "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"

# Keep the Library object alive: torch drops the registrations when it is freed.
_LIBRARY = None
STATE = "not-run"  # "native" | "patched" | "absent", for diagnostics and tests


def _forget_partial_import() -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def ensure_torchvision_importable() -> str:
    """Import torchvision, repairing the CPU-torch case; return what happened."""
    global _LIBRARY, STATE
    if STATE in ("native", "patched"):
        return STATE
    try:
        importlib.import_module("torchvision")
        STATE = "native"
        return STATE
    except ModuleNotFoundError:
        STATE = "absent"
        return STATE
    except RuntimeError as exc:
        if "torchvision::nms" not in str(exc):
            raise
    _forget_partial_import()
    import torch

    _LIBRARY = torch.library.Library("torchvision", "FRAGMENT")
    _LIBRARY.define(_NMS_SCHEMA)
    _LIBRARY.define(_QNMS_SCHEMA)
    importlib.import_module("torchvision")
    STATE = "patched"
    return STATE
