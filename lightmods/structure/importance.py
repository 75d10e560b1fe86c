"""Importance scores the pruning methods share."""

from __future__ import annotations

import torch

from lightmods.peft.layer import AdapterLayer


@torch.no_grad()
def rank_taylor(layer: AdapterLayer) -> torch.Tensor | None:
    """First-order Taylor importance of each rank of an adapter, ``|mean_j(A*dA)[r]| + |mean_i(B*dB)[:, r]|``
    (Light-PEFT; the absolute value is taken after the signed mean). None before any gradient."""
    a, b = layer.rank_factors()
    if a.grad is None or b.grad is None:
        return None
    s = (a * a.grad).float().mean(dim=1).abs() + (b * b.grad).float().mean(dim=0).abs()
    return torch.nan_to_num(s, nan=0.0, posinf=0.0, neginf=0.0)


@torch.no_grad()
def output_ratio(
    out: torch.Tensor, base: torch.Tensor, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Light-PEFT's module importance for one forward pass: per token, the norm of what the adapter adds
    over the norm of the frozen layer's output, averaged over non-padding tokens."""
    ratio = (out.float() - base.float()).norm(dim=-1) / base.float().norm(dim=-1).clamp_min(1e-12)
    if token_mask is not None and token_mask.shape == ratio.shape:
        m = token_mask.to(ratio.dtype)
        return (ratio * m).sum() / m.sum().clamp_min(1)
    return ratio.mean()
