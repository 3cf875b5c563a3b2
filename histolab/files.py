"""Model files, judged by content: format sniffing, hashing, safe loading.

A file's name says nothing about what it is (a pickle renamed ``.safetensors``
is still a pickle), so the format is decided from its first bytes. safetensors
is preferred; torch pickles are only ever opened with ``weights_only=True``,
which refuses any object that is not a tensor or a plain container.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from histolab.errors import UnsafeFile

# A safetensors header longer than this is refused before it is read: real
# headers are a few hundred kB even for SDXL; a huge length is an attack or junk.
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024

_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def sniff(path: str | Path) -> str:
    """'safetensors', 'torch-zip' (torch.save), 'pickle', 'empty' or 'unknown'."""
    p = Path(path)
    with open(p, "rb") as fh:
        head = fh.read(16)
    if not head:
        return "empty"
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if head[:1] == b"\x80" and len(head) > 1 and head[1] in range(2, 6):
        return "pickle"
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= MAX_SAFETENSORS_HEADER and head[8:9] == b"{":
            return "safetensors"
        if n > MAX_SAFETENSORS_HEADER and head[8:9] == b"{":
            return "safetensors-oversized"
    return "unknown"


def sha256_file(path: str | Path) -> str:
    """Full sha256 of a file, cached by (path, size, mtime)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]


def short_hash(digest: str) -> str:
    """The 10-hex-digit form SD-webui prints as 'Model hash'."""
    return digest[:10]


def safetensors_header(path: str | Path) -> dict:
    p = Path(path)
    size = p.stat().st_size
    with open(p, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise UnsafeFile(f"{p.name}: too short to be a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_SAFETENSORS_HEADER or n + 8 > size:
            raise UnsafeFile(f"{p.name}: safetensors header length {n} is larger than the file or the limit")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UnsafeFile(f"{p.name}: safetensors header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise UnsafeFile(f"{p.name}: safetensors header is not a JSON object")
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2):
            raise UnsafeFile(f"{p.name}: tensor {key!r} has no valid data_offsets")
        end = max(end, int(offsets[1]))
    if 8 + n + end > size:
        raise UnsafeFile(f"{p.name}: file is truncated ({size} bytes, tensors need {8 + n + end})")
    return header


def load_state_dict(path: str | Path) -> tuple[dict, dict]:
    """(tensors, metadata) from a safetensors or torch file, decided by content.

    Tensors are checked for finite values. Raises UnsafeFile for anything else.
    """
    import torch

    p = Path(path)
    kind = sniff(p)
    if kind == "safetensors":
        from safetensors import safe_open

        safetensors_header(p)
        try:
            with safe_open(str(p), framework="pt") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        except Exception as exc:  # safetensors raises its own error types
            raise UnsafeFile(f"{p.name}: cannot read safetensors ({exc})") from exc
    elif kind in ("torch-zip", "pickle"):
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # weights_only refuses code-carrying pickles with UnpicklingError
            raise UnsafeFile(
                f"{p.name}: refused to load: it is a pickle that contains more than tensors "
                f"(only weights-only torch files and safetensors are accepted): {str(exc).splitlines()[0]}"
            ) from exc
        if not isinstance(obj, dict):
            raise UnsafeFile(f"{p.name}: a torch file holding {type(obj).__name__}, not a state dict")
        tensors, meta = obj, {}
    elif kind == "empty":
        raise UnsafeFile(f"{p.name}: the file is empty")
    elif kind == "safetensors-oversized":
        raise UnsafeFile(f"{p.name}: safetensors header is larger than {MAX_SAFETENSORS_HEADER} bytes")
    else:
        raise UnsafeFile(f"{p.name}: not a safetensors or torch weights file (unrecognised content)")
    check_finite(tensors, p.name)
    return tensors, meta


def check_finite(tensors, name: str, prefix: str = "") -> None:
    """Raise if any floating tensor, at any depth of dicts and lists, is not finite."""
    import torch

    items = tensors.items() if isinstance(tensors, dict) else enumerate(tensors)
    for k, v in items:
        key = f"{prefix}{k}"
        if isinstance(v, torch.Tensor):
            if v.is_floating_point() and not _all_finite(v):
                raise UnsafeFile(f"{name}: tensor {key!r} contains NaN or infinite values")
        elif isinstance(v, (dict, list, tuple)):
            check_finite(v, name, key + ".")


def _all_finite(t) -> bool:
    """True when no element is NaN or infinite.

    A sum is NaN or infinite whenever any element is, and it costs a fraction of
    an element-wise isfinite() (about 40x less for fp16 on CPU: 20 ms vs 0.86 s
    for 50 M values). Only when the sum itself is not finite (a NaN, or a
    legitimate overflow) is every element checked.
    """
    import torch

    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())
