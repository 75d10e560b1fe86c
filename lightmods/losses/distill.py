"""Knowledge-distillation terms (COST-EFF's ``softCE`` and hidden-state MSE, as the official code defines them)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_cross_entropy(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``mean_batch(-sum_c softmax(teacher/T)_c log softmax(student/T)_c)`` (no ``T^2`` factor, as the official
    code at its default ``T = 1``). Equals ``KL(teacher || student) + H(teacher)``."""
    target = F.softmax(teacher.detach().float() / temperature, dim=-1)
    return -(target * F.log_softmax(student.float() / temperature, dim=-1)).sum(-1).mean()


def hidden_mse(
    student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """MSE of one layer's hidden states: mean over the hidden dimension, summed over non-padding tokens and
    divided by their number, then averaged over the batch."""
    per_token = (student.float() - teacher.detach().float()).pow(2).mean(-1)  # (batch, tokens)
    if attention_mask is None:
        return per_token.mean()
    m = attention_mask.to(per_token.dtype)
    return ((per_token * m).sum(-1) / m.sum(-1).clamp_min(1)).mean()


def hidden_states_mse(
    student: list[torch.Tensor], teacher: list[torch.Tensor], attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Sum of :func:`hidden_mse` over layers mapped 1:1 (embedding output and every layer)."""
    if len(student) != len(teacher):
        raise ValueError(f"{len(student)} student hidden states vs {len(teacher)} of the teacher")
    return torch.stack([hidden_mse(s, t, attention_mask) for s, t in zip(student, teacher)]).sum()
