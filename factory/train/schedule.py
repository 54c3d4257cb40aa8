"""Learning rate as a pure function of the optimizer step, so a resumed run needs no state.

Steps count from 1 (the first optimizer update). Warmup rises linearly to the peak, reaching
it at `warmup_steps`; decay then runs from the peak at `warmup_steps` to `min_lr` at
`total_steps`. "wsd" (warmup-stable-decay, Hu et al. 2024, MiniCPM, arXiv:2404.06395) holds
the peak and decays linearly over the last `decay_fraction` of the steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

Decay = Literal["linear", "cosine", "constant", "wsd"]


@dataclass(frozen=True)
class LRSchedule:
    lr: float
    total_steps: int
    warmup_steps: int = 0
    decay: Decay = "linear"
    min_lr: float = 0.0
    decay_fraction: float = 0.2   # wsd only: share of the steps spent decaying

    def __post_init__(self) -> None:
        if self.total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps {self.warmup_steps} must lie in "
                             f"[0, total_steps={self.total_steps}]")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr} exceeds the peak lr {self.lr}")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"decay_fraction must be in (0, 1], got {self.decay_fraction}")

    def __call__(self, step: int) -> float:
        return lr_at(step, self)


def lr_at(step: int, s: LRSchedule) -> float:
    """The learning rate of optimizer step `step` (1-based)."""
    if s.warmup_steps and step <= s.warmup_steps:
        return s.lr * step / s.warmup_steps
    if s.decay == "constant":
        return s.lr
    if s.decay == "wsd":
        decay_steps = max(1, round(s.decay_fraction * (s.total_steps - s.warmup_steps)))
        start = s.total_steps - decay_steps
        if step <= start:
            return s.lr
        progress = min(1.0, (step - start) / decay_steps)
        return s.min_lr + (s.lr - s.min_lr) * (1.0 - progress)
    span = s.total_steps - s.warmup_steps
    progress = 1.0 if span <= 0 else min(1.0, max(0.0, (step - s.warmup_steps) / span))
    if s.decay == "linear":
        return s.min_lr + (s.lr - s.min_lr) * (1.0 - progress)
    if s.decay == "cosine":
        return s.min_lr + (s.lr - s.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown decay {s.decay!r}")
