"""Learning rate: linear warmup, then a half-cosine decay to a floor (SGDR, Loshchilov & Hutter 2017,
eq. 5, without restarts; the warmup follows Goyal et al. 2017).

    lr(s) = lr * (s + 1) / warmup                                  for s < warmup
    lr(s) = lr * (r + (1 - r) * (1 + cos(pi * p)) / 2),  p = (s - warmup) / (max_steps - warmup)

with r = min_lr_ratio and p clamped to [0, 1]. It is a pure function of the step, so resuming (even
with another number of processes) needs no scheduler state.
"""
from __future__ import annotations

import math


def learning_rate(step: int, *, lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """The learning rate of optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    return lr * (min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))
