"""PAT's loss on its globally shared hidden-channel mask ``m`` (init 0; channel ``c`` is kept when
``m_c > 0`` after training):

``L = 10 |sum_c STE(m_c >= 0) - d_keep| / d_keep + mean_{m > 0} (m - 0.5)^2 + mean_{m <= 0} (m + 0.5)^2``

The first term steers the number of kept channels to the target ``d_keep`` (straight-through: forward the
0/1 count, backward the identity), the other two push every mask value away from 0 toward +-0.5. An empty
side (all ``m <= 0`` at the start) contributes 0 here; the official code takes the mean of an empty tensor
there (a NaN loss value whose gradient is still finite).
"""

from __future__ import annotations

import torch

from lightmods.methods.base import LossTerm


def mask_budget_loss(mask: torch.Tensor, target: int) -> torch.Tensor:
    from lightmods.structure.hsm import _BinarizeSTE

    m = mask.float().flatten()
    count = _BinarizeSTE.apply(m).sum()
    loss = 10.0 * (count - target).abs() / target
    pos, neg = m[m > 0], m[m <= 0]
    if pos.numel():
        loss = loss + ((pos - 0.5) ** 2).mean()
    if neg.numel():
        loss = loss + ((neg + 0.5) ** 2).mean()
    return loss


def mask_budget_term(weight: float = 1.0, name: str = "mask") -> LossTerm:
    """``LossTerm(name)`` on the shared mask of ``module.model``'s HSMs (0 once they are merged away)."""
    from lightmods.structure.hsm import get_hsms

    def fn(module, batch: dict, logits: torch.Tensor) -> torch.Tensor:
        hsm = get_hsms(module.model)
        if hsm is None:
            return logits.new_zeros(())
        return mask_budget_loss(hsm.mask.mask, hsm.mask.target).to(logits.device)

    return LossTerm(name, weight, fn)
