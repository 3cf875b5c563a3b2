"""An undo log for changes made to a loaded base model while adapters are applied.

Adapters never modify a base tensor in place. Each change is one of: a forward
hook added (LoRA), a parameter's storage swapped for another tensor
(DreamBooth), an attribute or module replaced (tokenizer, token embedding,
attention processors), an entry added to a dict (conditioners). The log keeps
the original object of each and puts it back in reverse order, so removing
the adapters restores the model bit for bit: no subtraction, no float error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_MISSING = object()


class ModelEdit:
    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def __len__(self) -> int:
        return len(self._undo)

    def hook(self, module, fn) -> None:
        """A forward hook (PyTorch's extension point for changing a module's output)."""
        handle = module.register_forward_hook(fn)
        self._undo.append(handle.remove)

    def swap_data(self, param, tensor) -> None:
        """Point ``param`` at ``tensor``; the original storage is kept and put back."""
        old = param.data
        param.data = tensor

        def undo() -> None:
            param.data = old

        self._undo.append(undo)

    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        old = getattr(obj, name, _MISSING)
        setattr(obj, name, value)

        def undo() -> None:
            if old is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, old)

        self._undo.append(undo)

    def set_item(self, mapping: dict, key: Any, value: Any) -> None:
        old = mapping.get(key, _MISSING)
        mapping[key] = value

        def undo() -> None:
            if old is _MISSING:
                mapping.pop(key, None)
            else:
                mapping[key] = old

        self._undo.append(undo)

    def on_undo(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` when the edit is undone (for changes made through a library's own setter)."""
        self._undo.append(fn)

    def undo(self) -> None:
        """Undo everything, newest first. Every step runs even if one fails; the first error is raised after."""
        first: BaseException | None = None
        while self._undo:
            fn = self._undo.pop()
            try:
                fn()
            except BaseException as exc:  # keep restoring the rest, then report
                first = first or exc
        if first is not None:
            raise first
