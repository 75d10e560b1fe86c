"""PAT's Identity Loss: ``MSE(W_down W_down^T, I)`` for the down projection ``W_down`` (``rank x d``) of every
Hybrid Sparsification Module, pushing its rows toward an orthonormal set. It "decouples the transformation and
scaling properties of the HSMs": with orthonormal rows the low-rank operator transforms, and the per-channel
scale ``g`` (trained only with this loss) scales.

The official code adds the term of the model-level HSM and, through a loop-variable slip, only the last
decoder layer's ones; here every HSM's term is summed (the paper's intent).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lightmods.methods.base import LossTerm


def identity_loss(downs: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_k mean((W_k W_k^T - I)^2)`` over the given ``rank x d`` matrices."""
    terms = []
    for w in downs:
        gram = w.float() @ w.float().t()
        terms.append(F.mse_loss(gram, torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)))
    return torch.stack(terms).sum()


def identity_term(weight: float = 1.0, name: str = "identity") -> LossTerm:
    """``LossTerm(name)`` over the HSMs of ``module.model`` (0 once they are merged away)."""
    from lightmods.structure.hsm import get_hsms

    def fn(module, batch: dict, logits: torch.Tensor) -> torch.Tensor:
        hsm = get_hsms(module.model)
        downs = hsm.low_rank_downs() if hsm is not None else []
        return identity_loss(downs).to(logits.device) if downs else logits.new_zeros(())

    return LossTerm(name, weight, fn)
