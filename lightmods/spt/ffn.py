"""SPT routed FFN: the FFN's inner dimension is cut into equal blocks and a router picks, per token, the
``active_blocks`` blocks that are computed (Gui et al., arXiv 2312.10365).

The router is a linear layer over the token's FFN input. Per token it keeps the blocks with the largest
logits; tokens are then batched per block, and only that block's slice of the up (and gate) rows and down
columns is multiplied (a loop over blocks, as the official ``RoutedFFN`` does). A block's output is scaled
by ``2 * sigmoid(logit)`` (``gate="scaled_sigmoid"``, the paper's: 1 at a zero logit), which is what lets the
task loss train the router. ``gate="straight_through"`` scales by exactly 1 in the forward pass but passes the
same kind of gradient to the router (``1 + s - s.detach()`` with ``s = sigmoid(logit)``).

LoRA on an FFN projection is restricted to the active blocks too (its ``B`` rows for the up/gate
projections, its ``A`` columns for the down projection), as in the official ``LoRARoutedFFN``. The layers are
read by name at every call, so the same code runs on LoRA layers, merged ones and plain ``nn.Linear``.

Module names stay those of the transformers model (``intermediate.dense``, ``output.dense``, ``mlp.up_proj``,
...): the wrappers adopt the original children, and add ``spt_router``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lightmods.peft import AdapterLayer, LoraLinear

GATES = ("scaled_sigmoid", "straight_through")


class BlockRouter(nn.Module):
    """``Linear(hidden, n_blocks)``; picks ``active`` blocks per token and their output scales."""

    def __init__(self, hidden: int, n_blocks: int, active: int, gate: str, init_std: float, ref: torch.Tensor):
        super().__init__()
        self.proj = nn.Linear(hidden, n_blocks, device=ref.device, dtype=ref.dtype)
        nn.init.normal_(self.proj.weight, std=init_std)
        nn.init.zeros_(self.proj.bias)
        self.n_blocks, self.active, self.gate = n_blocks, active, gate
        self.enabled = True

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [T, hidden]`` -> chosen blocks ``[T, active]`` and their scales ``[T, active]``."""
        top, idx = self.proj(x).topk(self.active, dim=-1)
        s = torch.sigmoid(top.float()).to(x.dtype)
        scale = 2 * s if self.gate == "scaled_sigmoid" else 1 + s - s.detach()
        return idx, scale

    def extra_repr(self) -> str:
        return f"n_blocks={self.n_blocks}, active={self.active}, gate={self.gate}"


def _lora(linear: nn.Module) -> tuple[nn.Linear, LoraLinear | None]:
    """The base linear and the (unmerged) LoRA layer around it, if any."""
    if type(linear) is LoraLinear:
        return linear.base_layer, (None if linear.merged else linear)
    if isinstance(linear, AdapterLayer):
        raise TypeError(f"the routed FFN takes nn.Linear or LoraLinear, not {type(linear).__name__}")
    return linear, None


def lora_down(linear: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``A dropout(x)`` of a LoRA layer for all tokens (rank-wide, cheap), or None."""
    _, lora = _lora(linear)
    return lora.lora_A(lora.lora_dropout(x)) if lora is not None else None


def block_rows(linear: nn.Module, x: torch.Tensor, s: int, e: int, ax: torch.Tensor | None) -> torch.Tensor:
    """Output features ``s:e`` of ``linear(x)``; ``ax`` = :func:`lora_down` of the same tokens."""
    base, lora = _lora(linear)
    bias = base.bias[s:e] if base.bias is not None else None
    y = F.linear(x, base.weight[s:e], bias)
    if lora is not None:
        y = y + F.linear(ax, lora.lora_B.weight[s:e]) * lora.scaling
    return y


def block_cols(linear: nn.Module, h: torch.Tensor, s: int, e: int) -> torch.Tensor:
    """``linear`` applied to ``h`` placed at input features ``s:e`` (zeros elsewhere), without the bias."""
    base, lora = _lora(linear)
    y = F.linear(h, base.weight[:, s:e])
    if lora is not None:
        y = y + F.linear(F.linear(lora.lora_dropout(h), lora.lora_A.weight[:, s:e]), lora.lora_B.weight) * lora.scaling
    return y


@dataclass
class RoutedActivations:
    """The routed intermediate activations of one encoder FFN: per computed block, its tokens, slot in the
    token's choice list, activations ``[n, block]`` and scales; passed from the intermediate to the output."""

    tokens: int
    shape: torch.Size
    blocks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]]  # (tok, h, scale, start, end)


def routed_activations(x: torch.Tensor, router: BlockRouter, ins: list[nn.Module], combine) -> RoutedActivations:
    """Per block, the activations ``combine([rows of each input projection])`` of the tokens that chose it."""
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    idx, scale = router(x)
    width = _lora(ins[0])[0].out_features
    size = width // router.n_blocks
    ax = [lora_down(lin, x) for lin in ins]
    out = []
    for b in range(router.n_blocks):
        tok, slot = (idx == b).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        s, e = b * size, (b + 1) * size
        xs = x.index_select(0, tok)
        pre = [block_rows(lin, xs, s, e, a.index_select(0, tok) if a is not None else None) for lin, a in zip(ins, ax)]
        out.append((tok, combine(pre), scale[tok, slot].unsqueeze(-1), s, e))
    return RoutedActivations(x.shape[0], shape, out)


def routed_output(acts: RoutedActivations, down: nn.Module) -> torch.Tensor:
    """``down`` applied block by block to :func:`routed_activations`, scaled, summed per token, plus bias."""
    base, _ = _lora(down)
    y = None
    for tok, h, scale, s, e in acts.blocks:
        part = block_cols(down, h, s, e) * scale
        y = part.new_zeros(acts.tokens, base.out_features).index_add(0, tok, part) if y is None else y.index_add(0, tok, part)
    if y is None:
        y = torch.zeros(acts.tokens, base.out_features, dtype=base.weight.dtype, device=base.weight.device)
    if base.bias is not None:
        y = y + base.bias
    return y.reshape(*acts.shape[:-1], base.out_features)


class RoutedIntermediate(nn.Module):
    """Replaces an encoder's ``intermediate`` (``dense`` + activation); returns :class:`RoutedActivations`."""

    def __init__(self, intermediate: nn.Module, router: BlockRouter):
        super().__init__()
        self.dense = intermediate.dense
        self.intermediate_act_fn = intermediate.intermediate_act_fn
        self.spt_router = router

    def forward(self, hidden_states: torch.Tensor):
        if not self.spt_router.enabled:
            return self.intermediate_act_fn(self.dense(hidden_states))
        return routed_activations(hidden_states, self.spt_router, [self.dense], lambda pre: self.intermediate_act_fn(pre[0]))


class RoutedOutput(nn.Module):
    """Replaces an encoder's FFN ``output`` (``dense``, dropout, ``LayerNorm`` over the residual)."""

    def __init__(self, output: nn.Module):
        super().__init__()
        self.dense = output.dense
        self.dropout = output.dropout
        self.LayerNorm = output.LayerNorm

    def forward(self, hidden_states, input_tensor: torch.Tensor) -> torch.Tensor:
        if isinstance(hidden_states, RoutedActivations):
            hidden_states = routed_output(hidden_states, self.dense)
        else:
            hidden_states = self.dense(hidden_states)
        return self.LayerNorm(self.dropout(hidden_states) + input_tensor)


class RoutedGatedMLP(nn.Module):
    """Replaces a LLaMA-style ``mlp``: ``down(act(gate(x)) * up(x))`` computed on the routed blocks only."""

    def __init__(self, mlp: nn.Module, gate: str, up: str, down: str, router: BlockRouter):
        super().__init__()
        self.names = (gate, up, down)
        for n in self.names:
            setattr(self, n, getattr(mlp, n))
        self.act_fn = mlp.act_fn
        self.spt_router = router

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        if not self.spt_router.enabled:
            return down(self.act_fn(gate(x)) * up(x))
        acts = routed_activations(x, self.spt_router, [gate, up], lambda pre: self.act_fn(pre[0]) * pre[1])
        return routed_output(acts, down)
