"""When an extra loss term is in force: the step schedule that the maximum-entropy defense and the mask L1
penalty share. It lives apart from both so that importing either (or :mod:`lightmods.losses`) alone never runs into
the methods package importing them back."""

from __future__ import annotations


def schedule_factor(
    step: int, start_step: int = 0, warmup_steps: int = 0, end_step: int | None = None
) -> float:
    """The share of the weight in force at optimizer step ``step`` (0-based): 0 before ``start_step`` and from
    ``end_step`` on; in between it rises linearly over ``warmup_steps`` steps (``1/w, 2/w, ..., 1``), or is 1
    at once when ``warmup_steps=0``. Constant: the defaults; a step start: ``start_step``; a linear warm-up:
    ``warmup_steps``."""
    if step < start_step or (end_step is not None and step >= end_step):
        return 0.0
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step - start_step + 1) / warmup_steps)
