"""Compactors for Weight-Inherited Distillation (WID, Wu et al., Findings NAACL 2024): every block linear layer
``y = W x + b`` becomes ``y = R (W (C x) + b)`` with a row compactor ``R`` (out x out) and a column compactor
``C`` (in x in), both initialised to the identity, so the wrapped model is the teacher exactly.

Channels are masked through the compactors: an input channel ``j`` of a layer is column ``j`` of its ``C``, an
output channel ``i`` is row ``i`` of its ``R``. One mask over the hidden (residual) dimension is shared by
every compactor acting on it (the input side of q/k/v and of the FFN input projections, the output side of
the attention and FFN output projections), so the widths stay consistent across layers; FFN neurons have a
mask per layer (rows of the FFN input projections' ``R``, columns of the FFN output projection's ``C``), and
attention units one per layer (``head`` strategy: rows of q/k/v ``R``, columns of the attention output ``C``).
The hidden mask also acts through :mod:`lightmods.structure.hidden_gate` (a fixed 0/1 gate), so norms take
their statistics over the kept channels and the merged, sliced student equals the masked compactor model.

Merging (the official ``convert.py``): ``W_S = R W C`` and ``b_S = R b`` per layer, then the structural core
slices the kept channels (``PruningPlan`` hidden / neurons / heads) into a smaller dense model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lightmods.peft.inject import _parent
from lightmods.peft.layer import LinearShape
from lightmods.structure.plan import PruningPlan, unit_rows
from lightmods.structure.spec import Block, blocks


class CompactedLinear(LinearShape, nn.Module):
    """``R (W (C x) + b)`` around a kept base ``nn.Linear`` (its parameters keep their ``base_layer.`` names)."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"compactors wrap nn.Linear, got {type(base).__name__}")
        self.base_layer = base
        ref = base.weight
        self.row = nn.Parameter(torch.eye(base.out_features, dtype=ref.dtype, device=ref.device))
        self.col = nn.Parameter(torch.eye(base.in_features, dtype=ref.dtype, device=ref.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.base_layer(F.linear(x, self.col)), self.row)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The equivalent plain layer: ``W' = R W C``, ``b' = R b``."""
        base = self.base_layer
        out = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device=base.weight.device, dtype=base.weight.dtype)
        out.weight.copy_(self.row @ base.weight @ self.col)
        if base.bias is not None:
            out.bias.copy_(self.row @ base.bias)
        out.weight.requires_grad_(base.weight.requires_grad)
        if base.bias is not None:
            out.bias.requires_grad_(base.bias.requires_grad)
        return out


def block_linears(block: Block) -> list[str]:
    lay = block.layout
    return [lay.query, lay.key, lay.value, lay.attn_out, *lay.ffn_in, lay.ffn_out]


def add_compactors(model: nn.Module) -> list[str]:
    """Wrap every block linear layer of ``model`` in identity compactors; returns the wrapped names."""
    names = []
    for block in blocks(model):
        for rel in block_linears(block):
            name = block.full_name(rel)
            parent, child = _parent(model, name)
            layer = getattr(parent, child)
            if not isinstance(layer, CompactedLinear):
                setattr(parent, child, CompactedLinear(layer))
            names.append(name)
    return names


def compactors(model: nn.Module) -> list[tuple[str, CompactedLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, CompactedLinear)]


@torch.no_grad()
def merge_compactors(model: nn.Module) -> nn.Module:
    """Replace every compactor-wrapped layer by its merged plain layer (in place); returns ``model``."""
    for name, layer in compactors(model):
        parent, child = _parent(model, name)
        setattr(parent, child, layer.merged())
    return model


@dataclass
class CompactorMasks:
    """Kept channels (True) of the shared hidden dimension, of each layer's FFN neurons and attention units."""

    hidden: torch.Tensor
    neurons: list[torch.Tensor]
    units: list[torch.Tensor]

    @classmethod
    def full(cls, model: nn.Module) -> CompactorMasks:
        bl = blocks(model)
        first = bl[0].linear(bl[0].layout.query)
        return cls(
            hidden=torch.ones(first.in_features, dtype=torch.bool),
            neurons=[torch.ones(b.num_neurons, dtype=torch.bool) for b in bl],
            units=[torch.ones(b.num_units, dtype=torch.bool) for b in bl],
        )

    def to_plan(self, model: nn.Module) -> PruningPlan:
        """The slicing that turns the merged model into the dense student."""
        plan = PruningPlan()
        for b, n, u in zip(blocks(model), self.neurons, self.units):
            if not bool(n.all()):
                plan.neurons[b.index] = torch.nonzero(n).flatten().tolist()
            if not bool(u.all()):
                plan.heads[b.index] = torch.nonzero(u).flatten().tolist()
        if not bool(self.hidden.all()):
            plan.hidden = torch.nonzero(self.hidden).flatten().tolist()
        return plan

    def to_dict(self) -> dict:
        as_list = lambda t: t.to(torch.uint8).tolist()  # noqa: E731
        return {"hidden": as_list(self.hidden), "neurons": [as_list(n) for n in self.neurons], "units": [as_list(u) for u in self.units]}

    @classmethod
    def from_dict(cls, d: dict) -> CompactorMasks:
        as_mask = lambda v: torch.tensor(v, dtype=torch.bool)  # noqa: E731
        return cls(as_mask(d["hidden"]), [as_mask(n) for n in d["neurons"]], [as_mask(u) for u in d["units"]])


def masked_entries(model: nn.Module, masks: CompactorMasks) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """``(compactor, boolean mask of its entries that belong to masked channels)`` for every compactor with any:
    the rows of ``R`` / columns of ``C`` of every masked channel."""
    out = []
    for b, n, u in zip(blocks(model), masks.neurons, masks.units):
        lay = b.layout
        q_rows = torch.ones(b.linear(lay.query).out_features, dtype=torch.bool)
        kv_rows = torch.ones(b.linear(lay.key).out_features, dtype=torch.bool)
        dropped = torch.nonzero(~u).flatten().tolist()
        if dropped:
            q_rows[unit_rows(b, dropped, True)] = False
            kv_rows[unit_rows(b, dropped, False)] = False
        sides = {  # (row keep over outputs, col keep over inputs)
            lay.query: (q_rows, masks.hidden), lay.key: (kv_rows, masks.hidden), lay.value: (kv_rows, masks.hidden),
            lay.attn_out: (masks.hidden, q_rows), lay.ffn_out: (masks.hidden, n),
            **{rel: (n, masks.hidden) for rel in lay.ffn_in},
        }  # fmt: skip
        for rel, (rows, cols) in sides.items():
            layer = b.linear(rel)
            if not isinstance(layer, CompactedLinear):
                continue
            if not bool(rows.all()):
                m = torch.zeros_like(layer.row, dtype=torch.bool)
                m[~rows.to(m.device), :] = True
                out.append((layer.row, m))
            if not bool(cols.all()):
                m = torch.zeros_like(layer.col, dtype=torch.bool)
                m[:, ~cols.to(m.device)] = True
                out.append((layer.col, m))
    return out


@torch.no_grad()
def zero_masked_(model: nn.Module, masks: CompactorMasks) -> None:
    """Set the compactor entries of masked channels to exactly zero (what the L2 shrinking converges to)."""
    for p, m in masked_entries(model, masks):
        p.masked_fill_(m.to(p.device), 0.0)


def channel_scores(model: nn.Module) -> dict:
    """L2 norms per channel, summed over the compactors acting on it: ``hidden`` (columns of the hidden-input
    ``C``s, rows of the hidden-output ``R``s, over all layers), per layer ``neurons`` and ``units``."""
    bl = blocks(model)
    neurons, units = [], []
    for b in bl:
        lay = b.layout
        n = sum(b.linear(r).row.detach().float().norm(dim=1) for r in lay.ffn_in) + b.linear(lay.ffn_out).col.detach().float().norm(dim=0)
        neurons.append(n.cpu())
        qn = b.linear(lay.query).row.detach().float().norm(dim=1) + b.linear(lay.attn_out).col.detach().float().norm(dim=0)
        kvn = b.linear(lay.key).row.detach().float().norm(dim=1) + b.linear(lay.value).row.detach().float().norm(dim=1)
        units.append((qn.view(b.num_units, -1).sum(1) + kvn.view(b.num_units, -1).sum(1)).cpu())
    return {"hidden": hidden_scores(model), "neurons": neurons, "units": units}


def hidden_scores(model: nn.Module) -> torch.Tensor:
    """Per hidden channel, the L2 norms of the columns of every hidden-input ``C`` plus the rows of every
    hidden-output ``R``, summed over all layers (on the CPU)."""
    hidden = None
    for b in blocks(model):
        lay = b.layout
        h = sum(b.linear(r).col.detach().float().norm(dim=0) for r in (lay.query, lay.key, lay.value, *lay.ffn_in))
        h = h + sum(b.linear(r).row.detach().float().norm(dim=1) for r in (lay.attn_out, lay.ffn_out))
        hidden = h if hidden is None else hidden + h
    return hidden.cpu()
