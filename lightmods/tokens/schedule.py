"""EViT's keep-rate schedule: keep every token at first, then lower the keep rate to its target.

As the official ``helpers.adjust_keep_rate``: 1.0 until ``start`` epochs, then over ``length`` epochs a cosine
decrease ``target + (1 - target) * (cos(pi * p) + 1) / 2`` (``p`` the fraction of the ramp done, evaluated at
every optimizer step), then the target. ``linear`` ramps straight down instead; ``none`` uses the target from
the first step (the official fine-tuning recipe).
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "linear", "none")


def keep_rate_at(epoch: float, target: float, start: float = 0.0, length: float = 1.0, kind: str = "cosine") -> float:
    """The keep rate after ``epoch`` (fractional) epochs of training."""
    if kind not in SCHEDULES:
        raise ValueError(f"schedule {kind!r}: accepted {', '.join(SCHEDULES)}")
    if kind == "none":
        return target
    if epoch < start:
        return 1.0
    if length <= 0 or epoch >= start + length:
        return target
    p = (epoch - start) / length
    if kind == "linear":
        return 1.0 - (1.0 - target) * p
    return target + (1.0 - target) * (math.cos(math.pi * p) + 1.0) * 0.5
