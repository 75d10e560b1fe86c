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

Why ``select=all`` cannot remove a backdoor by itself: on a poisoned row the objective ``-log p_t + lambda (-H(p))``
has its minimum at ``p_t > 1/C`` for every ``lambda`` (the entropy term is flat in the argmax), so the trigger
still wins the argmax and ASR stays. ``select=low_loss`` reads "neutralise the minimal cross-entropy fine-tuning
on poisoned data" literally: in each batch the ``select_ratio`` share of rows with the lowest cross-entropy (the
rows fit fastest, which is where poisoned rows end up once the trigger is learnt, the observation behind
anti-backdoor learning) is trained on ``lambda * L_ME`` **instead of** cross-entropy, so a trigger learnt on
them is pushed back toward the uniform prediction; the other rows keep plain cross-entropy. Measured, that
premise fails on SST-2 (``experiments/bench/backdoor_loss_dynamics.py``: at no step of fine-tuning are the poisoned
rows the lowest- or highest-loss ones), while the same substitution on the poisoned rows themselves removes the
backdoor. ``select=lexical`` therefore substitutes on the rows a data-level isolation flags before training
(``batch["suspect"]``, :mod:`lightmods.attacks.isolation`: rows holding a frequent, label-exclusive token).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lightmods.losses.schedule import schedule_factor
from lightmods.methods.base import LossTerm

FORMS = ("entropy", "uniform_ce")
SELECTIONS = ("all", "low_loss", "lexical")


def entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``H(softmax(logits / T))`` per row, natural log."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def max_entropy_rows(logits: torch.Tensor, form: str = "entropy", temperature: float = 1.0) -> torch.Tensor:
    """``L_ME`` per row: ``-H(p)`` (``entropy``) or ``-(1/C) sum_c log p_c`` (``uniform_ce``)."""
    if form == "entropy":
        return -entropy(logits, temperature)
    if form == "uniform_ce":
        return -F.log_softmax(logits.float() / temperature, dim=-1).mean(-1)
    raise ValueError(f"form={form!r}; accepted: {', '.join(FORMS)}")


def max_entropy_loss(logits: torch.Tensor, form: str = "entropy", temperature: float = 1.0) -> torch.Tensor:
    """The batch mean of :func:`max_entropy_rows`."""
    return max_entropy_rows(logits, form, temperature).mean()


def lowest_loss_rows(losses: torch.Tensor, valid: torch.Tensor, ratio: float) -> torch.Tensor:
    """Boolean mask of the ``ceil(ratio * n)`` valid rows with the lowest loss (ties: lower index first)."""
    n = int(valid.sum())
    out = torch.zeros_like(valid)
    if n == 0:
        return out
    k = max(1, math.ceil(ratio * n))
    keyed = torch.where(valid, losses.detach().float(), torch.full_like(losses.detach().float(), math.inf))
    out[torch.argsort(keyed, stable=True)[:k]] = True
    return out


def neutralising_loss(logits: torch.Tensor, labels: torch.Tensor, weight: float, ratio: float, form: str = "entropy",
                      temperature: float = 1.0) -> torch.Tensor:  # fmt: skip
    """What ``select=low_loss`` adds to the batch's mean cross-entropy so that its ``ratio`` lowest-loss rows
    train on ``weight * L_ME`` instead: ``(1/n) sum_{i in S} (weight * L_ME_i - CE_i)`` over the ``n`` labelled
    rows (the cross-entropy part cancels those rows' share of the task loss exactly)."""
    return _neutralise(logits, labels, weight, ratio, form, temperature)[0]


def _neutralise(logits, labels, weight, ratio, form, temperature, flagged=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``flagged`` (rows chosen beforehand) replaces the lowest-loss choice."""
    valid = labels != -100
    ce = F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="none")
    chosen = lowest_loss_rows(ce, valid, ratio) if flagged is None else flagged.bool().to(valid.device) & valid
    n = max(1, int(valid.sum()))
    return (weight * max_entropy_rows(logits, form, temperature)[chosen].sum() - ce[chosen].sum()) / n, chosen


def selection_figures(chosen: torch.Tensor, poisoned: torch.Tensor) -> dict[str, float]:
    """How well a row selection isolates the rows an attack poisoned (known to the benchmark, not to the
    defense): ``precision`` = poisoned share of the selected rows, ``recall`` = selected share of the
    poisoned rows (NaN-free: 0 when the batch has none)."""
    poisoned = poisoned.bool()
    hit = float((chosen & poisoned).sum())
    return {
        "precision": hit / max(1, int(chosen.sum())),
        "recall": hit / max(1, int(poisoned.sum())),
    }


def max_entropy_term(weight: float, form: str = "entropy", temperature: float = 1.0, start_step: int = 0,
                     warmup_steps: int = 0, end_step: int | None = None, select: str = "all",
                     select_ratio: float = 0.1) -> LossTerm:  # fmt: skip
    """``LossTerm("max_entropy")`` logged as ``train/loss_max_entropy``. ``select=all``: the unweighted ``L_ME``,
    added as ``weight * schedule_factor(step) * L_ME``. ``select=low_loss``: :func:`neutralising_loss` (the
    weight inside it), added times ``schedule_factor(step)``, so the schedule phases the substitution in and out;
    ``select=lexical``: the same substitution on the batch's ``suspect`` rows."""

    def schedule(step: int) -> float:
        return schedule_factor(step, start_step, warmup_steps, end_step)

    if select in ("low_loss", "lexical"):

        def neutralise(module, batch: dict, logits: torch.Tensor) -> torch.Tensor:
            flagged = None
            if select == "lexical":
                flagged = batch.get("suspect")
                if flagged is None:
                    raise ValueError("defense.select=lexical: the batch has no 'suspect' rows (no isolation ran on this data)")
            loss, chosen = _neutralise(logits, batch["labels"], weight, select_ratio, form, temperature, flagged)
            if batch.get("poisoned") is not None and getattr(module, "_trainer", None) is not None:
                # whether the selected rows are the poisoned ones: the premise of the selection
                for key, value in selection_figures(chosen, batch["poisoned"].to(chosen.device)).items():
                    module.log(f"train/me_select_{key}", value, batch_size=len(chosen))
            return loss

        return LossTerm("max_entropy", 1.0, neutralise, schedule=schedule)
    if select != "all":
        raise ValueError(f"select={select!r}; accepted: {', '.join(SELECTIONS)}")

    def fn(module, batch: dict, logits: torch.Tensor) -> torch.Tensor:
        return max_entropy_loss(logits, form, temperature)

    return LossTerm("max_entropy", weight, fn, schedule=schedule)
