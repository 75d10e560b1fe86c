"""Width-only slenderization (COST-EFF): Taylor importance of attention heads and FFN neurons, per-layer
top-k selection into a :class:`PruningPlan`, and the linearly interpolated targets of iterative pruning.

Importance (the official ``taylor_fake_iteration``): over some batches accumulate ``A = sum |dL/dW|`` for the
attention output projection and the FFN projections, then ``S = |A * W|`` elementwise. A head (attention
unit) scores the sum of ``S(attn_out)`` over its input columns (only the output projection, as the official
code); an FFN neuron scores ``S(ffn_in)`` summed over its row plus ``S(ffn_out)`` summed over its column.
"""

from __future__ import annotations

import torch
from torch import nn

from lightmods.structure.plan import PruningPlan, unit_rows
from lightmods.structure.spec import Block, blocks


class TaylorScores:
    """Accumulates ``sum |grad|`` of the weights that score heads and neurons, over backward passes."""

    def __init__(self, model: nn.Module):
        self.blocks = blocks(model)
        self.weights: dict[str, torch.Tensor] = {}
        for b in self.blocks:
            for rel in (b.layout.attn_out, *b.layout.ffn_in, b.layout.ffn_out):
                self.weights[b.full_name(rel)] = b.linear(rel).weight
        self.abs_grad = {k: torch.zeros_like(w, dtype=torch.float32) for k, w in self.weights.items()}

    def params(self) -> list[torch.Tensor]:
        return list(self.weights.values())

    @torch.no_grad()
    def add(self, grads: list[torch.Tensor | None]) -> None:
        for key, g in zip(self.weights, grads):
            if g is not None:
                self.abs_grad[key] += g.float().abs()

    @torch.no_grad()
    def saliency(self, key: str) -> torch.Tensor:
        return (self.abs_grad[key] * self.weights[key].float()).abs()

    @torch.no_grad()
    def head_scores(self, block: Block) -> torch.Tensor:
        s = self.saliency(block.full_name(block.layout.attn_out)).sum(0)  # per input column
        return torch.stack([s[unit_rows(block, [u], True)].sum() for u in range(block.num_units)])

    @torch.no_grad()
    def neuron_scores(self, block: Block) -> torch.Tensor:
        s = sum(self.saliency(block.full_name(rel)).sum(1) for rel in block.layout.ffn_in)
        return s + self.saliency(block.full_name(block.layout.ffn_out)).sum(0)


def top_k(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` largest scores, in their original order (ties: the lower index)."""
    k = max(1, min(int(k), scores.numel()))
    order = torch.sort(scores.double(), descending=True, stable=True).indices[:k]
    return sorted(order.tolist())


def slender_plan(
    scores: TaylorScores, heads: int | None, neurons: int | None, embedding_rank: int | None = None
) -> PruningPlan:
    """Keep the top ``heads`` attention units and ``neurons`` FFN neurons in every layer (indices relative to
    the model scored); ``None`` leaves that part as it is."""
    plan = PruningPlan(embedding_rank=embedding_rank)
    for b in scores.blocks:
        if heads is not None and heads < b.num_units:
            plan.heads[b.index] = top_k(scores.head_scores(b), heads)
        if neurons is not None and neurons < b.num_neurons:
            plan.neurons[b.index] = top_k(scores.neuron_scores(b), neurons)
    return plan


def interpolate(start: int, target: int, event: int, events: int, schedule: str = "linear") -> int:
    """Size after prune event ``event`` of ``events`` going from ``start`` to ``target``: ``linear`` removes the
    same number of units at every event (the official schedule, so the last events remove the largest share of
    what is left); ``geometric`` removes the same share at every event."""
    if events <= 0 or event >= events:
        return target
    if schedule == "geometric":
        return max(target, int(round(start * (target / start) ** (event / events))))
    return int(round(start - (start - target) * event / events))
