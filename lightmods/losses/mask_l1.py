"""The sparsity term of mask-based structured pruning: the L1 norm of every trainable structure gate (attention
units, FFN neurons, hidden channels), ``sum_g sum_i |m_{g,i}|`` (a plain sum, as Light-PEFT's official gate
term), with a schedule on its weight: 0 before ``start_step``, a linear rise over ``warmup_steps``, full until
``end_step`` (the end of sparse training), 0 from then on.
"""

from __future__ import annotations

import torch

from lightmods.losses.schedule import schedule_factor
from lightmods.methods.base import LossTerm
from lightmods.structure.gates import get_gates


def mask_l1(model: torch.nn.Module) -> torch.Tensor | None:
    """``sum |m|`` over every gate of ``model`` (None when it has no gates, e.g. after extraction)."""
    gates = get_gates(model)
    return gates.l1() if gates is not None else None


def mask_l1_term(weight: float, start_step: int = 0, warmup_steps: int = 0, end_step: int | None = None,
                 name: str = "mask_l1") -> LossTerm:  # fmt: skip
    """``LossTerm(name)``: ``weight * s(step) * sum|m|``, logged unweighted as ``train/loss_<name>``."""

    def fn(module, batch: dict, logits: torch.Tensor) -> torch.Tensor:
        value = mask_l1(module.model)
        return value.to(logits.device) if value is not None else logits.new_zeros(())

    def schedule(step: int) -> float:
        return schedule_factor(step, start_step, warmup_steps, end_step)

    return LossTerm(name, weight, fn, schedule=schedule)
