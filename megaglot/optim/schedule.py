"""Learning-rate schedule: linear warm-up, then cosine or linear decay to min_lr."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class LRSchedule:
    """The LR as a pure function of the iteration: nothing to drift, trivially resumable."""

    max_lr: float
    """Peak learning rate, reached at the end of warm-up."""
    min_lr: float = 0.0
    """Floor the decay ends at."""
    warmup_iters: int = 0
    """Iterations of linear warm-up from 0."""
    decay_iters: int = 1
    """Iteration at which the decay reaches min_lr (usually --train-iters)."""
    style: str = "cosine"
    """'cosine', 'linear' or 'constant'."""

    def __post_init__(self):
        if self.style not in ("cosine", "linear", "constant"):
            raise ValueError(f"--lr-decay-style must be cosine, linear or constant, got {self.style!r}")
        if self.min_lr > self.max_lr:
            raise ValueError(f"--min-lr {self.min_lr} exceeds --lr {self.max_lr}")

    def lr(self, iteration: int) -> float:
        """LR for the step that produces iteration+1 (iteration counts completed steps)."""
        if self.warmup_iters > 0 and iteration < self.warmup_iters:
            return self.max_lr * (iteration + 1) / self.warmup_iters
        if self.style == "constant":
            return self.max_lr
        span = max(1, self.decay_iters - self.warmup_iters)
        progress = min(1.0, (iteration - self.warmup_iters) / span)
        if self.style == "linear":
            factor = 1.0 - progress
        else:
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr + (self.max_lr - self.min_lr) * factor

    def state_dict(self) -> dict:
        return asdict(self)
