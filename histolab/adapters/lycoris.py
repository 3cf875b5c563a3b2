"""The weight updates of the LyCORIS family, as their writers publish them, for layers whose update is not a
plain ``up @ down``: LoHa, LoKr and the DoRA weight decomposition.

* LoHa (LyCORIS ``functional/loha.py``; SD-webui ``network_hada.py``):
  ``dW = (hada_w1_a @ hada_w1_b) * (hada_w2_a @ hada_w2_b) * alpha / rank``, rank = ``hada_w1_b.shape[0]``,
  reshaped to the layer's weight (a convolution's ``hada_w*_b`` is ``(rank, in * kh * kw)``);
* LoKr (``functional/lokr.py``; ``network_lokr.py``): ``dW = kron(w1, w2) * scale``, each factor stored whole
  (``lokr_w1``, ``lokr_w2``) or as a low-rank pair (``lokr_w1_a @ lokr_w1_b``, ``lokr_w2_a @ lokr_w2_b``);
  scale = alpha / rank of the decomposed factor, 1 when both are whole. A convolution's ``lokr_w2`` carries the
  kernel and ``w1`` is broadcast over it;
* DoRA (LyCORIS ``weight_decompose``; peft ``lora_magnitude_vector``): ``W' = m * (W + dW) / ||W + dW||`` with
  the norm per output row (peft, LyCORIS >= 2.2 ``wd_on_out``) or per input column (older LyCORIS files,
  magnitude shaped ``(1, in)``). At strength ``s``: ``W' = (W + s dW) * (s * (m / ||W + s dW|| - 1) + 1)``,
  LyCORIS's multiplier rule, equal to peft's formula at ``s = 1`` and to the base model at ``s = 0``.

Tucker (CP) variants for convolutions, as SD-webui rebuilds them (``lyco_helpers.make_weight_cp`` and
``rebuild_cp_decomposition``): LoHa ``hada_t1``/``hada_t2`` (r, r, kh, kw) with ``hada_w*_a`` (r, out) and
``hada_w*_b`` (r, in): ``w = einsum('ijkl,jr,ip->prkl', t, w_b, w_a)``; LoKr ``lokr_t2`` the same for w2;
LoCon ``lora_mid`` (r, r, kh, kw) between ``lora_down`` (r, in, 1, 1) and ``lora_up`` (out, r, 1, 1):
``dW = einsum('nmkl,in,mj->ijkl', mid, up, down) * alpha / r``.
"""

from __future__ import annotations

from typing import Any

LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
CP_KEYS = ("lora_down.weight", "lora_mid.weight", "lora_up.weight")


def rank(kind: str, f: dict[str, Any]) -> int | None:
    """The rank alpha is divided by; None where the update has none (a LoKr with both factors whole)."""
    if kind == "loha":
        return int(f["hada_w1_b"].shape[0])
    if kind == "lora_cp":
        return int(f["lora_down.weight"].shape[0])
    for k in ("lokr_w1_b", "lokr_w2_b"):
        if k in f:
            return int(f[k].shape[0])
    return None


def check(kind: str, f: dict[str, Any], weight_shape: tuple[int, ...]) -> str | None:
    """Why the factors cannot make an update of ``weight_shape`` (None when they can); shapes only."""
    out, numel = weight_shape[0], 1
    for d in weight_shape:
        numel *= d
    if kind == "lora_cp":
        down, mid, up = (tuple(f[k].shape) for k in CP_KEYS)
        r = down[0]
        if len(mid) != 4 or mid[:2] != (r, r) or up[:2] != (out, r) or down[1:2] != weight_shape[1:2]:
            return f"lora_down {list(down)}, lora_mid {list(mid)} and lora_up {list(up)} do not chain"
        if (out, down[1], *mid[2:]) != tuple(weight_shape):
            return f"makes an update of {[out, down[1], *mid[2:]]}, the layer's weight is {list(weight_shape)}"
        return None
    if kind == "loha":
        missing = [k for k in LOHA_KEYS[:4] if k not in f]
        if missing:
            return f"has no {', '.join(missing)}"
        if "hada_t1" in f or "hada_t2" in f:
            return _check_loha_cp(f, weight_shape)
        w1a, w1b, w2a, w2b = (tuple(f[k].shape) for k in LOHA_KEYS[:4])
        if len(w1a) != 2 or len(w1b) != 2 or w1a[1] != w1b[0] or w2a != (w1a[0], w2a[1]) or w2b != (w2a[1], w1b[1]):
            return f"hada_w1_a/b and hada_w2_a/b do not chain ({list(w1a)}, {list(w1b)}, {list(w2a)}, {list(w2b)})"
        if w1a[0] != out or w1a[0] * w1b[1] != numel:
            return f"makes an update of {w1a[0]} x {w1b[1]}, the layer's weight is {list(weight_shape)}"
        return None
    w1 = _pair_shape(f, "lokr_w1")
    w2 = _pair_shape(f, "lokr_w2")
    if isinstance(w1, str) or isinstance(w2, str):
        return w1 if isinstance(w1, str) else w2
    if len(w1) != 2:
        return f"lokr_w1 must be a matrix but has shape {list(w1)}"
    rows, cols = w1[0] * w2[0], w1[1] * w2[1]
    kernel = 1
    for d in w2[2:]:
        kernel *= d
    if rows != out or rows * cols * kernel != numel:
        return f"kron of {list(w1)} and {list(w2)} does not make the layer's weight {list(weight_shape)}"
    return None


def _cp_shape(t, wa, wb) -> tuple[int, ...] | str:
    """Shape of ``einsum('ijkl,jr,ip->prkl', t, wb, wa)``, or why the three do not chain."""
    t, wa, wb = tuple(t.shape), tuple(wa.shape), tuple(wb.shape)
    if len(t) != 4 or len(wa) != 2 or len(wb) != 2 or t[0] != wa[0] or t[1] != wb[0]:
        return f"Tucker core {list(t)} and factors {list(wa)}, {list(wb)} do not chain"
    return (wa[1], wb[1], *t[2:])


def _check_loha_cp(f: dict[str, Any], weight_shape: tuple[int, ...]) -> str | None:
    if "hada_t1" not in f or "hada_t2" not in f:
        return "has hada_t1 or hada_t2 but not both"
    for i in ("1", "2"):
        shape = _cp_shape(f[f"hada_t{i}"], f[f"hada_w{i}_a"], f[f"hada_w{i}_b"])
        if isinstance(shape, str):
            return shape
        if shape != tuple(weight_shape):
            return f"makes an update of {list(shape)}, the layer's weight is {list(weight_shape)}"
    return None


def _cp(t, wa, wb):
    import torch

    return torch.einsum("i j k l, j r, i p -> p r k l", t, wb, wa).contiguous()


def _pair_shape(f: dict[str, Any], stem: str):
    if stem == "lokr_w2" and "lokr_t2" in f and "lokr_w2_a" in f and "lokr_w2_b" in f:
        return _cp_shape(f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
    if stem in f:
        return tuple(f[stem].shape)
    a, b = f.get(stem + "_a"), f.get(stem + "_b")
    if a is None or b is None:
        return f"has neither {stem} nor both {stem}_a and {stem}_b"
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        return f"{stem}_a {list(a.shape)} and {stem}_b {list(b.shape)} do not multiply"
    return (int(a.shape[0]), int(b.shape[1]))


def dense(kind: str, f: dict[str, Any], weight_shape: tuple[int, ...]):
    """The unscaled update (without alpha / rank), shaped like the layer's weight."""
    import torch

    if kind == "lora_cp":
        up, down = f["lora_up.weight"].flatten(1), f["lora_down.weight"].flatten(1)
        return torch.einsum("n m k l, i n, m j -> i j k l", f["lora_mid.weight"], up, down)
    if kind == "loha":
        if "hada_t1" in f:
            w1 = _cp(f["hada_t1"], f["hada_w1_a"], f["hada_w1_b"])
            return w1 * _cp(f["hada_t2"], f["hada_w2_a"], f["hada_w2_b"])
        w = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])
        return w.reshape(weight_shape)
    if kind == "lokr":
        w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
        if "lokr_t2" in f:
            w2 = _cp(f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
        else:
            w2 = f["lokr_w2"] if "lokr_w2" in f else f["lokr_w2_a"] @ f["lokr_w2_b"]
        if w2.ndim == 4:
            w1 = w1[:, :, None, None]
        return torch.kron(w1, w2).reshape(weight_shape)
    raise ValueError(kind)


def low_rank_dense(down, up, weight_shape: tuple[int, ...]):
    """``up @ down`` of a LoRA (a convolution's down carries the kernel, its up is 1x1), weight-shaped."""
    return (up.flatten(1) @ down.flatten(1)).reshape(weight_shape)


def magnitude_axis(magnitude, weight_shape: tuple[int, ...], peft: bool) -> str | None:
    """ "rows" (one magnitude per output), "columns" (per input, older LyCORIS), or None when it fits neither."""
    out, inp = weight_shape[0], weight_shape[1]
    shape = tuple(magnitude.shape)
    n = magnitude.numel()
    if n == out and (peft or shape[0] == out or len(shape) == 1):
        return "rows"
    if not peft and len(shape) >= 2 and shape[0] == 1 and shape[1] == inp and n == inp:
        return "columns"
    return None


def decompose(weight, delta, magnitude, axis: str, strength: float):
    """DoRA: the change to ``weight`` at ``strength``, given the update ``delta`` (already scaled by alpha/rank)."""
    import torch

    merged = weight + strength * delta
    if axis == "rows":
        norm = merged.flatten(1).norm(dim=1).reshape(-1, *[1] * (weight.ndim - 1))
        m = magnitude.reshape(norm.shape)
    else:
        norm = merged.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (weight.ndim - 2))
        m = magnitude.reshape(norm.shape)
    factor = strength * (m / (norm + torch.finfo(norm.dtype).eps) - 1) + 1
    return merged * factor - weight
