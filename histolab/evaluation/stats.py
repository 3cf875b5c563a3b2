"""Streaming statistics of features: float64 sums, so any number of images fits in memory.

``RunningStats`` keeps n, the sum and the sum of outer products of
``x - shift`` (shift = the first vector seen: it removes most of the mean
before squaring, so the covariance does not lose digits to cancellation,
and it does not depend on how the vectors were batched). ``CosineGram``
keeps the sum of outer products of L2-normalised vectors, all the Vendi
score needs. Both merge, save and load as plain arrays.
"""

from __future__ import annotations

import numpy as np

FLUSH_ROWS = 512  # rows buffered before their outer products are added (bounded memory: 512 x dim floats)


class RunningStats:
    def __init__(self, dim: int):
        self.dim = dim
        self.n = 0
        self.shift: np.ndarray | None = None
        self.s1 = np.zeros(dim, dtype=np.float64)
        self._s2 = np.zeros((dim, dim), dtype=np.float64)
        self._pending: list[np.ndarray] = []
        self._pending_rows = 0

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected (n, {self.dim}) features, got {x.shape}")
        if len(x) == 0:
            return
        if self.shift is None:
            self.shift = x[0].copy()
        d = x - self.shift
        self.n += len(x)
        self.s1 += d.sum(axis=0)
        # Outer products are added FLUSH_ROWS at a time: adding to a 2048 x 2048
        # float64 matrix costs the same for 8 rows as for 1024.
        self._pending.append(d)
        self._pending_rows += len(d)
        if self._pending_rows >= FLUSH_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            d = np.concatenate(self._pending)
            self._s2 += d.T @ d
            self._pending, self._pending_rows = [], 0

    @property
    def s2(self) -> np.ndarray:
        self._flush()
        return self._s2

    @s2.setter
    def s2(self, value: np.ndarray) -> None:
        self._pending, self._pending_rows = [], 0
        self._s2 = value

    @property
    def mean(self) -> np.ndarray:
        self._need(1)
        return self.shift + self.s1 / self.n

    @property
    def cov(self) -> np.ndarray:
        """Unbiased covariance (divides by n - 1), as numpy.cov, torch-fidelity and torchmetrics."""
        self._need(2)
        m = self.s1 / self.n
        c = (self.s2 - self.n * np.outer(m, m)) / (self.n - 1)
        return (c + c.T) / 2

    def _need(self, k: int) -> None:
        if self.n < k:
            raise ValueError(f"statistics of {self.n} vectors: at least {k} needed")

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "n": np.array([self.n], dtype=np.int64),
            "shift": self.shift if self.shift is not None else np.zeros(self.dim),
            "s1": self.s1,
            "s2": self.s2,
        }

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> RunningStats:
        st = cls(int(a["s1"].shape[0]))
        st.n = int(a["n"][0])
        st.shift = np.asarray(a["shift"], dtype=np.float64) if st.n else None
        st.s1 = np.asarray(a["s1"], dtype=np.float64)
        st.s2 = np.asarray(a["s2"], dtype=np.float64)
        return st


class CosineGram:
    """Sum of u u^T over L2-normalised vectors u: the d x d form of the n x n cosine kernel."""

    def __init__(self, dim: int):
        self.n = 0
        self._g = np.zeros((dim, dim), dtype=np.float64)
        self._pending: list[np.ndarray] = []
        self._pending_rows = 0

    def update(self, x: np.ndarray) -> None:
        u = normalise(np.asarray(x, dtype=np.float64))
        self.n += len(u)
        self._pending.append(u)
        self._pending_rows += len(u)
        if self._pending_rows >= FLUSH_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            u = np.concatenate(self._pending)
            self._g += u.T @ u
            self._pending, self._pending_rows = [], 0

    @property
    def g(self) -> np.ndarray:
        self._flush()
        return self._g

    @g.setter
    def g(self, value: np.ndarray) -> None:
        self._pending, self._pending_rows = [], 0
        self._g = value


def normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)
