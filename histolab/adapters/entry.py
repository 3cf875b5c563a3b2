"""One line of the adapter registry (histolab.adapters.registry.scan): its own module, without torch, so
that the app can read a saved scan back before torch is imported (histolab.ui.services)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Entry:
    name: str
    path: str
    kind: str  # an adapter kind, "base model", or "?" when it cannot be read
    format: str
    base: str  # the base it was made for, as far as the files say
    fits: bool | None  # None: not checked
    why: str  # why it does not fit (or a note when it does)
    trigger: str = ""
    encoder: str = ""
    # What loading it into the base does (histolab.adapters.report.LoadReport.summary): detected format,
    # modules patched in the U-Net and text encoder, keys ignored (each listed). Empty when not checked.
    report: str = ""
    ignored: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)
