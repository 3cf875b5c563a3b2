"""Progress reports: what the loop tells its callback (the UI makes ``gr.Progress`` of them)."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Progress:
    phase: str  # loading, caching, class-images, training, sampling, validating, saving, done, cancelled, failed
    step: int = 0  # optimiser steps done
    total_steps: int = 0
    epoch: int = 0  # the epoch in progress (1-based), or the last finished one
    epochs: int = 0
    loss: float | None = None  # mean over the last few steps
    lr: float | None = None  # the first parameter group's current learning rate
    samples_per_s: float | None = None  # training images per second over the last few steps
    eta_s: float | None = None  # training steps left at the current speed (sampling/validation not included)
    message: str = ""

    @property
    def fraction(self) -> float:
        return self.step / self.total_steps if self.total_steps else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fraction"] = self.fraction
        return d

    def line(self) -> str:
        parts = [f"[{self.phase}]"]
        if self.total_steps:
            parts.append(f"step {self.step}/{self.total_steps}")
        if self.epochs:
            parts.append(f"epoch {self.epoch}/{self.epochs}")
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.lr is not None:
            parts.append(f"lr {self.lr:.2e}")
        if self.samples_per_s is not None:
            parts.append(f"{self.samples_per_s:.1f} img/s")
        if self.eta_s is not None:
            parts.append(f"eta {format_seconds(self.eta_s)}")
        if self.message:
            parts.append(self.message)
        return " ".join(parts)


def format_seconds(s: float) -> str:
    s = round(s)
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


class Meter:
    """Moving window over recent steps: mean loss, images per second, time per step."""

    def __init__(self, window: int = 20):
        self.times: deque[float] = deque(maxlen=window + 1)
        self.losses: deque[float] = deque(maxlen=window)
        self.images: deque[int] = deque(maxlen=window)

    def start(self) -> None:
        """Start the clock (at the loop's start and after a pause such as sampling, which is not step time)."""
        self.times.clear()
        self.images.clear()
        self.times.append(time.perf_counter())

    def add(self, loss: float, images: int) -> None:
        if not self.times:
            self.start()
        self.times.append(time.perf_counter())
        self.losses.append(loss)
        self.images.append(images)

    def loss(self) -> float | None:
        return sum(self.losses) / len(self.losses) if self.losses else None

    def rates(self) -> tuple[float | None, float | None]:
        """(images per second, seconds per step) over the window."""
        n = len(self.times) - 1
        if n < 1:
            return None, None
        dt = self.times[-1] - self.times[0]
        if dt <= 0:
            return None, None
        imgs = sum(list(self.images)[-n:])
        return imgs / dt, dt / n
