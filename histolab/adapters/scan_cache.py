"""The registry's scan of checkpoints/ kept on disk between app starts.

A scan loads every adapter to check its tensors, so it needs torch: 1.5 s of the app's start on the 2-core
machine of issue 14 only to import it, on the path to the page being served (its dropdowns list the
adapters). A start with checkpoints/ unchanged reads the last scan back instead. It is keyed by what the
scan depends on: the folder's listing with each entry's size and modification time (as the app's
in-memory cache is, histolab.ui.services), and histolab's adapter code (a changed loader may read a file
differently). The file holds names and verdicts only; nothing in it is loaded as a model. It lives in
the app's outputs folder (Paths.outputs, never served), beside the data it describes.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

from histolab.adapters.entry import Entry
from histolab.config import PACKAGE_ROOT

FORMAT = 1


def _code_signature() -> list:
    folder = PACKAGE_ROOT / "adapters"
    out = []
    for p in sorted(folder.glob("*.py")):
        st = p.stat()
        out.append([p.name, st.st_size, st.st_mtime_ns])
    return out


def cache_file(checkpoints: Path, outputs: Path) -> Path:
    digest = hashlib.sha256(str(Path(checkpoints).resolve()).encode()).hexdigest()[:16]
    return Path(outputs) / "cache" / f"adapter-scan-{digest}.json"


def _key(signature: tuple) -> str:
    doc = {"format": FORMAT, "folder": signature, "code": _code_signature()}
    return hashlib.sha256(json.dumps(doc, default=list).encode()).hexdigest()


def load(checkpoints: Path, signature: tuple, outputs: Path) -> list[Entry] | None:
    """The saved scan for this state of ``checkpoints``, or None (none saved, stale or unreadable)."""
    try:
        doc = json.loads(cache_file(checkpoints, outputs).read_text())
        if doc.get("key") != _key(signature):
            return None
        return [Entry(**e) for e in doc["entries"]]
    except (OSError, ValueError, TypeError, KeyError):
        return None


def save(checkpoints: Path, signature: tuple, entries: list[Entry], outputs: Path) -> None:
    path = cache_file(checkpoints, outputs)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": _key(signature), "entries": [asdict(e) for e in entries]}))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache: the next start scans again
