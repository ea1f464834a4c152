"""Learning-rate schedule: linear warmup, then cosine decay to a floor. A pure function of the step."""

from __future__ import annotations

import math

__all__ = ["lr_factor"]


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (1-based: the first update is step 1).

    Warmup: ``step / warmup_steps`` for step <= warmup_steps. Then cosine from 1 at the end of warmup
    to ``min_ratio`` at ``total_steps`` (and ``min_ratio`` after it).
    """
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    if warmup_steps > 0 and step <= warmup_steps:
        return step / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 0:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
