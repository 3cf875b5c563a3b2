"""Make ``import torchvision`` work on a CPU-only torch.

PyPI's torchvision wheels are linked against CUDA builds of torch. On a CPU
build (``torch==2.13.0+cpu``, which is what this project pins) its compiled
extension ``torchvision/_C.so`` cannot load, and ``torchvision/__init__``
then dies in ``_meta_registrations`` while registering a fake kernel for
``torchvision::nms``, an operator that only the extension would have defined.
transformers, diffusers (through peft) and timm all import torchvision, so
without this nothing imports.

The fix is the smallest one that uses torch's own extension point: when the
extension cannot load, define the schemas of the two operators that
``_meta_registrations`` registers unconditionally (``nms`` and ``qnms``). The
pure-Python parts of torchvision (transforms, model definitions) then import,
which is all histolab and timm need; the compiled ops still raise
torchvision's own "Couldn't load custom C++ ops" error if called. Where the
extension loads (a CUDA torch, or a matching CPU torchvision) nothing is
defined and torchvision is untouched.

It runs lazily: ``install()`` (called by ``import histolab``) puts a finder at
the front of ``sys.meta_path`` that acts the first time anything imports
torchvision, prepares the ground, removes itself and lets the normal import
proceed. So ``import histolab`` stays cheap (no torch import) for processes
that never need torchvision, such as the review store's CLI.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from pathlib import Path

_NMS_SCHEMA = "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
_QNMS_SCHEMA = "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"

# Keep the Library object alive: torch drops the registrations when it is freed.
_LIBRARY = None
# "not-run" | "native" (extension loads) | "patched" (schemas defined) | "absent"
STATE = "not-run"


def _prepare() -> str:
    """Make the coming ``import torchvision`` succeed; say what was needed."""
    global _LIBRARY
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return "absent"
    import torch

    extension = next(iter(sorted(Path(spec.origin).parent.glob("_C.*"))), None)
    if extension is not None:
        try:
            torch.ops.load_library(str(extension))
            return "native"
        except (OSError, RuntimeError):
            pass  # CUDA-linked extension on a CPU torch: fall through and define the schemas
    if _LIBRARY is None:
        _LIBRARY = torch.library.Library("torchvision", "FRAGMENT")
        _LIBRARY.define(_NMS_SCHEMA)
        _LIBRARY.define(_QNMS_SCHEMA)
    return "patched"


class _PrepareTorchvision(importlib.abc.MetaPathFinder):
    """One-shot finder: prepares torchvision's import, then defers to the normal finders."""

    def find_spec(self, fullname, path=None, target=None):
        global STATE
        if fullname != "torchvision":
            return None
        uninstall()
        STATE = _prepare()
        return None  # the regular path finder imports torchvision itself


_FINDER = _PrepareTorchvision()


def install() -> None:
    """Arrange for torchvision's import to be repaired when it first happens."""
    if "torchvision" in sys.modules or _FINDER in sys.meta_path:
        return
    sys.meta_path.insert(0, _FINDER)


def uninstall() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


def ensure_torchvision_importable() -> str:
    """Import torchvision now (repairing it if needed) and return STATE."""
    global STATE
    if "torchvision" not in sys.modules:
        install()
        try:
            importlib.import_module("torchvision")
        except ModuleNotFoundError:
            STATE = "absent"
    elif STATE == "not-run":
        STATE = "native"  # imported before histolab, so it needed no repair
    return STATE
