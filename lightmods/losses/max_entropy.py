"""The maximum-entropy loss of Liu et al. (Findings ACL 2023), "Maximum Entropy Loss, the Silver Bullet
Targeting Backdoor Attacks in Pre-trained Language Models".

The paper states (abstract) that a maximum-entropy loss is incorporated into fine-tuning to neutralise the
minimal cross-entropy fine-tuning on a union of poisoned and clean samples. Its exact formula, weight and
schedule are not available (no official code); the choices here follow the project's research notes and
are all config keys (``defense.*``):

- the term is applied to **every** training row, since the defender cannot tell poisoned rows apart;
- ``form=entropy``: ``L_ME = -H(p) = sum_c p_c log p_c`` with ``p = softmax(logits / T)``, averaged over
  the batch (the confidence penalty of Pereyra et al. 2017; minimising it maximises the entropy);
  ``form=uniform_ce``: ``L_ME = -(1/C) sum_c log p_c``, the cross-entropy of the uniform distribution
  (``KL(U || p) + log C``);
- total loss ``CE + lambda(step) * L_ME``, ``lambda`` from :func:`schedule_factor`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightmods.methods.base import LossTerm

FORMS = ("entropy", "uniform_ce")


def entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``H(softmax(logits / T))`` per row, natural log."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def max_entropy_loss(logits: torch.Tensor, form: str = "entropy", temperature: float = 1.0) -> torch.Tensor:
    """The batch mean of ``-H(p)`` (``entropy``) or of ``-(1/C) sum_c log p_c`` (``uniform_ce``)."""
    if form == "entropy":
        return -entropy(logits, temperature).mean()
    if form == "uniform_ce":
        return -F.log_softmax(logits.float() / temperature, dim=-1).mean(-1).mean()
    raise ValueError(f"form={form!r}; accepted: {', '.join(FORMS)}")


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


def max_entropy_term(weight: float, form: str = "entropy", temperature: float = 1.0, start_step: int = 0,
                     warmup_steps: int = 0, end_step: int | None = None) -> LossTerm:  # fmt: skip
    """``LossTerm("max_entropy")``: logged as ``train/loss_max_entropy`` (the unweighted ``L_ME``), added to the
    loss as ``weight * schedule_factor(step) * L_ME``."""

    def fn(module, batch: dict, logits: torch.Tensor) -> torch.Tensor:
        return max_entropy_loss(logits, form, temperature)

    def schedule(step: int) -> float:
        return schedule_factor(step, start_step, warmup_steps, end_step)

    return LossTerm("max_entropy", weight, fn, schedule=schedule)
