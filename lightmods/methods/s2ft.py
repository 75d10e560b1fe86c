"""S2FT (Yang et al., NeurIPS 2024, arXiv 2412.06289): structured sparse fine-tuning.

Select a few attention units and FFN channels, co-permute the coupled weights of each block so that the
selected ones are contiguous (the model's function is unchanged), and train one dense slice per projection:

- ``v_ratio``: output rows of the value projection of the selected attention units;
- ``o_ratio``: input columns of the attention-output projection of the selected units;
- ``u_ratio``: output rows of the up projection (``intermediate.dense`` in encoders) of selected channels;
- ``d_ratio``: input columns of the down projection (``output.dense`` in encoders) of selected channels.

Each ratio is a fraction of all (layer, unit) or (layer, channel) pairs of the model, selected globally as
in the official ``experiments/train/finetune.py`` (so per-layer counts vary); a ratio > 0 selects at least
one. Attention is handled in key/value units (one KV head and the query heads sharing it), which is one
head for multi-head attention and keeps grouped-query attention valid. Per block the order is
``only_v + (v and o) + only_o + rest`` (FFN: ``only_u + (u and d) + only_d + rest``), the official
``convert_{mha,ffn}_layer_to_s2`` order; query/key/value rows, attention-output columns, up/gate rows and
down columns are permuted together through :func:`lightmods.structure.apply_plan`.

Selection (``selection``):

- ``random`` (default, the paper's): uniform over the pairs, from a ``torch.Generator`` seeded with
  ``method.seed`` so that ``prepare`` picks the same slices on every fresh model (export reload, resume).
- ``weight_norm``: the pairs whose to-be-trained weights have the largest Frobenius norm (the unit's value
  rows or attention-output input columns, the channel's up row or down column), a data-free importance score.

``partial_backprop`` (default true) trains through :class:`lightmods.peft.s2.S2LinearFunction`, whose backward
keeps only the input slice a column delta needs; false computes the same gradients with plain autograd.

Defaults are sized for MiniLM-L6 (6 layers x 12 heads, 1536 channels): ``o_ratio=0.04`` (3 heads) and
``d_ratio=0.01`` (92 channels) train 72,192 backbone parameters, about LoRA r=8 on query/value (73,728).
The released LLaMA configurations likewise train only o and down (``o_ratio=0.052, d_ratio=0.02``).
``lr`` 1e-3 is the official learning rate for math_10k (2e-4 for commonsense_170k); on MiniLM/SST-2 with a
freshly initialised head, 120 steps reached dev accuracy 0.70 / 0.76 / 0.79 / 0.81 at 2e-4 / 5e-4 / 1e-3 / 2e-3.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lightmods.config import checks
from lightmods.errors import config_error
from lightmods.methods.base import Method, MethodConfig, register_method
from lightmods.models.families import Family
from lightmods.peft import mark_trainable
from lightmods.peft.inject import _parent
from lightmods.peft.s2 import S2Linear
from lightmods.structure import Block, PruningPlan, apply_plan, blocks
from lightmods.structure.plan import unit_rows
from lightmods.structure.surgery import forget_origins

SELECTIONS = ("random", "weight_norm")
PARTS = ("v", "o", "u", "d")


@dataclass
class S2FTConfig(MethodConfig):
    name: str = "s2ft"
    lr: float = 1e-3
    v_ratio: float = 0.0
    o_ratio: float = 0.04
    u_ratio: float = 0.0
    d_ratio: float = 0.01
    selection: str = "random"
    seed: int = 0
    partial_backprop: bool = True

    def __post_init__(self):
        super().__post_init__()
        for part in PARTS:
            checks.ratio(f"method.{part}_ratio", getattr(self, f"{part}_ratio"), closed_right=True)
        if not any(getattr(self, f"{p}_ratio") > 0 for p in PARTS):
            raise config_error(
                "method.o_ratio",
                self.o_ratio,
                "a number in (0, 1] when v_ratio, u_ratio and d_ratio are all 0 (nothing would train)",
            )
        checks.one_of("method.selection", self.selection, SELECTIONS)


def selection_count(ratio: float, total: int) -> int:
    """How many of ``total`` pairs a ratio selects: ``round(ratio * total)``, at least 1 when ``ratio > 0``."""
    return 0 if ratio <= 0 else min(total, max(1, round(ratio * total)))


def _unit_scores(block: Block, part: str) -> torch.Tensor:
    lay = block.layout
    units = range(block.num_units)
    if part == "v":
        w = block.linear(lay.value).weight
        return torch.stack([w[unit_rows(block, [u], False)].float().norm() for u in units])
    w = block.linear(lay.attn_out).weight
    return torch.stack([w[:, unit_rows(block, [u], True)].float().norm() for u in units])


def _channel_scores(block: Block, part: str) -> torch.Tensor:
    if part == "u":
        return block.linear(block.layout.ffn_in[-1]).weight.float().norm(dim=1)
    return block.linear(block.layout.ffn_out).weight.float().norm(dim=0)


def select_pairs(
    model_blocks: list[Block], ratios: dict[str, float], selection: str, seed: int
) -> dict[str, dict[int, list[int]]]:
    """Per part (v, o, u, d): layer index -> selected units / channels, chosen globally over all layers."""
    gen = torch.Generator().manual_seed(seed)
    chosen: dict[str, dict[int, list[int]]] = {}
    for part in PARTS:
        attn = part in ("v", "o")
        sizes = [b.num_units if attn else b.num_neurons for b in model_blocks]
        pairs = [(b.index, i) for b, n in zip(model_blocks, sizes) for i in range(n)]
        k = selection_count(ratios[part], len(pairs))
        if selection == "random":
            picked = torch.randperm(len(pairs), generator=gen)[:k]
        else:
            with torch.no_grad():
                scores = torch.cat(
                    [(_unit_scores if attn else _channel_scores)(b, part) for b in model_blocks]
                )
            picked = torch.sort(scores, descending=True, stable=True).indices[:k]
        per_layer: dict[int, list[int]] = {b.index: [] for b in model_blocks}
        for j in picked.tolist():
            layer, i = pairs[j]
            per_layer[layer].append(i)
        chosen[part] = {layer: sorted(v) for layer, v in per_layer.items()}
    return chosen


def co_order(
    first: list[int], second: list[int], n: int
) -> tuple[list[int], tuple[int, int], tuple[int, int]]:
    """The order ``only_first + both + only_second + rest`` of ``range(n)``, and the contiguous ranges
    (in units of the new order) that ``first`` and ``second`` occupy."""
    a, b = set(first), set(second)
    only_a = sorted(a - b)
    both = sorted(a & b)
    only_b = sorted(b - a)
    rest = [i for i in range(n) if i not in a | b]
    order = only_a + both + only_b + rest
    return order, (0, len(only_a) + len(both)), (len(only_a), len(only_a) + len(both) + len(only_b))


@register_method
class S2FT(Method):
    name = "s2ft"
    Config = S2FTConfig

    def prepare(self, model: nn.Module, family: Family) -> nn.Module:
        c = self.config
        self.family = family
        ratios = {p: getattr(c, f"{p}_ratio") for p in PARTS}
        model_blocks = blocks(model)
        self.selected = select_pairs(model_blocks, ratios, c.selection, c.seed)
        plan = PruningPlan()
        slices: list[tuple[Block, str, str, int, int]] = []  # block, module, axis, start, end
        for blk in model_blocks:
            lay, i = blk.layout, blk.index
            v, o = self.selected["v"][i], self.selected["o"][i]
            if v or o:
                order, (vs, ve), (os_, oe) = co_order(v, o, blk.num_units)
                plan.heads[i] = order
                kv, q = blk.head_dim, blk.head_dim * blk.group
                slices += [
                    (blk, lay.value, "out", vs * kv, ve * kv),
                    (blk, lay.attn_out, "in", os_ * q, oe * q),
                ]
            u, d = self.selected["u"][i], self.selected["d"][i]
            if u or d:
                order, (us, ue), (ds, de) = co_order(u, d, blk.num_neurons)
                plan.neurons[i] = order
                slices += [(blk, lay.ffn_in[-1], "out", us, ue), (blk, lay.ffn_out, "in", ds, de)]
        apply_plan(model, plan)  # a permutation: the function is unchanged
        forget_origins(model)  # the frozen base weights need no optimizer-state mapping; free the originals
        self.plan = plan
        self.injected = []
        for blk, rel, axis, start, end in slices:
            if end > start:
                name = blk.full_name(rel)
                parent, child = _parent(model, name)
                setattr(
                    parent,
                    child,
                    S2Linear(getattr(parent, child), start, end, axis, partial_backprop=c.partial_backprop),
                )
                self.injected.append(name)
        mark_trainable(model, head_patterns=self.head_patterns())
        return model

    def summary(self, model: nn.Module) -> dict:
        acc = super().summary(model)
        layers = sorted(self.selected["v"])
        per_layer = {f"{p}_per_layer": [len(self.selected[p][i]) for i in layers] for p in PARTS}
        model_blocks = blocks(model)
        acc["adapted_modules"] = len(self.injected)
        acc["s2ft"] = {
            "selection": self.config.selection,
            "seed": self.config.seed,
            "attention_units_total": sum(b.num_units for b in model_blocks),  # key/value heads
            "query_heads_per_unit": model_blocks[0].group if model_blocks else 1,
            "ffn_channels_total": sum(b.num_neurons for b in model_blocks),
            **{f"{p}_selected": sum(len(x) for x in self.selected[p].values()) for p in PARTS},
            **per_layer,
            "delta_params": sum(m.s2_delta.numel() for m in model.modules() if isinstance(m, S2Linear)),
        }
        return acc
