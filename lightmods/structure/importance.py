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


class TransitionalActs:
    """TransAct's importance: the L2 norm, over calibration tokens, of each channel of the *transitional*
    activations, i.e. the inputs of the attention output projection (per-head context vectors) and of the FFN
    down projection (post-activation intermediate output), collected by forward pre-hooks on
    ``layout.attn_out`` / ``layout.ffn_out``.

    ``score[l, j] = sqrt(sum_batches sum_tokens a[l, b, t, j]^2)`` over non-padding tokens (set
    :attr:`token_mask` to the batch's attention mask before each forward pass). A head scores
    ``mean_j s[h, j] + (10 / d_h) * max_j s[h, j]`` over its ``d_h`` channels (the official
    ``pruning_schedule``); an attention unit (a key/value head and its query heads, so grouped-query models
    are pruned group by group) sums its query heads' scores. Duck-typed like ``TaylorScores`` (``blocks``,
    ``head_scores``, ``neuron_scores``), so :func:`lightmods.structure.slenderize.slender_plan` selects from it.
    """

    def __init__(self, model: torch.nn.Module):
        from lightmods.structure.spec import blocks

        self.blocks = blocks(model)
        self.token_mask: torch.Tensor | None = None
        self.attn_sq: dict[int, torch.Tensor] = {}
        self.ffn_sq: dict[int, torch.Tensor] = {}
        self.tokens = 0
        self._handles = []
        for b in self.blocks:
            attn_out, ffn_out = b.linear(b.layout.attn_out), b.linear(b.layout.ffn_out)
            self._handles.append(attn_out.register_forward_pre_hook(self._accumulate(self.attn_sq, b.index)))
            self._handles.append(ffn_out.register_forward_pre_hook(self._accumulate(self.ffn_sq, b.index)))

    def _accumulate(self, store: dict, index: int):
        @torch.no_grad()
        def hook(module, args):
            x = args[0].detach().float()
            mask = self.token_mask
            if mask is not None and x.dim() == 3 and tuple(mask.shape) == tuple(x.shape[:2]):
                x = x[mask.to(torch.bool)]  # (non-padding tokens, channels)
            x = x.reshape(-1, x.shape[-1])
            if index == self.blocks[0].index and store is self.attn_sq:
                self.tokens += x.shape[0]
            sq = x.pow(2).sum(0)
            store[index] = sq if index not in store else store[index] + sq

        return hook

    def remove(self) -> None:
        """Detach the hooks (the accumulated sums stay)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @torch.no_grad()
    def attn_norms(self, block) -> torch.Tensor:
        """Per-channel L2 norm of the attention output projection's input (``heads * head_dim`` channels)."""
        return self.attn_sq[block.index].sqrt()

    @torch.no_grad()
    def neuron_scores(self, block) -> torch.Tensor:
        """Per-neuron L2 norm of the FFN down projection's input."""
        return self.ffn_sq[block.index].sqrt()

    @torch.no_grad()
    def head_scores(self, block) -> torch.Tensor:
        """One score per attention unit: the sum of its query heads' ``mean + (10/d_h) * max`` channel norms."""
        d = block.head_dim
        s = self.attn_norms(block).view(block.num_units, block.group, d)
        per_head = s.mean(-1) + (10.0 / d) * s.amax(-1)
        return per_head.sum(-1)
