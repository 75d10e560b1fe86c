"""A pruning decision as data: which attention units, FFN neurons, adapter modules and adapter ranks stay,
and (optionally) the rank of a low-rank factorised word embedding.

Indices always refer to the *original* model, so a plan applies to a freshly built model (resume, export
reload) and plans of successive pruning rounds compose with :meth:`PruningPlan.then`. An index list that is
a permutation of all indices reorders instead of pruning (S2FT's co-permutation uses the same path).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lightmods.peft.inject import _parent
from lightmods.peft.layer import AdapterLayer, select_linear
from lightmods.structure.spec import Block, blocks


@dataclass
class PruningPlan:
    heads: dict[int, list[int]] = field(default_factory=dict)  # layer -> kept attention units
    neurons: dict[int, list[int]] = field(default_factory=dict)  # layer -> kept FFN neurons
    removed_adapters: list[str] = field(default_factory=list)  # adapter layers unwrapped to their base
    ranks: dict[str, list[int]] = field(default_factory=dict)  # adapter layer -> kept ranks
    embedding_rank: int | None = None  # word embedding -> Embedding(V, r) + Linear(r -> H) (SVD); None: as is

    def to_dict(self) -> dict:
        d = {
            "heads": {str(k): list(map(int, v)) for k, v in self.heads.items()},
            "neurons": {str(k): list(map(int, v)) for k, v in self.neurons.items()},
            "removed_adapters": list(self.removed_adapters),
            "ranks": {k: list(map(int, v)) for k, v in self.ranks.items()},
        }
        if self.embedding_rank is not None:  # only when set: plans without it read and compare as before
            d["embedding_rank"] = int(self.embedding_rank)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PruningPlan:
        return cls(
            heads={int(k): list(v) for k, v in d.get("heads", {}).items()},
            neurons={int(k): list(v) for k, v in d.get("neurons", {}).items()},
            removed_adapters=list(d.get("removed_adapters", [])),
            ranks={k: list(v) for k, v in d.get("ranks", {}).items()},
            embedding_rank=d.get("embedding_rank"),
        )

    def then(self, later: PruningPlan) -> PruningPlan:
        """This plan followed by ``later`` (whose indices refer to the model this plan produced)."""

        def chain(first: dict, second: dict) -> dict:
            out = dict(first)
            for k, idx in second.items():
                out[k] = [first[k][i] for i in idx] if k in first else list(idx)
            return out

        return PruningPlan(
            heads=chain(self.heads, later.heads),
            neurons=chain(self.neurons, later.neurons),
            removed_adapters=sorted({*self.removed_adapters, *later.removed_adapters}),
            ranks=chain(
                {k: v for k, v in self.ranks.items() if k not in later.removed_adapters}, later.ranks
            ),
            embedding_rank=later.embedding_rank if later.embedding_rank is not None else self.embedding_rank,
        )

    def kept_per_layer(self, model_blocks: list[Block]) -> dict:
        """Heads and neurons kept per layer (all of them where the plan leaves a layer alone)."""
        return {
            "heads_kept_per_layer": [
                len(self.heads.get(b.index, range(b.num_units))) * b.group for b in model_blocks
            ],
            "neurons_kept_per_layer": [
                len(self.neurons.get(b.index, range(b.num_neurons))) for b in model_blocks
            ],
        }


def _select(module: nn.Module, out_index=None, in_index=None) -> None:
    if isinstance(module, AdapterLayer):
        module.select_features(out_index, in_index)
    else:
        select_linear(module, out_index, in_index)


def unit_rows(block: Block, units: list[int], per_query: bool) -> torch.Tensor:
    """Rows of the query (``per_query``) or key/value projection that belong to attention units ``units``."""
    width = block.head_dim * (block.group if per_query else 1)
    return (
        torch.cat([torch.arange(u * width, (u + 1) * width) for u in units])
        if units
        else torch.zeros(0, dtype=torch.long)
    )


def select_units(block: Block, units: list[int]) -> None:
    """Keep (or reorder) attention units: q/k/v output rows and the attention output's input columns."""
    lay = block.layout
    q_rows, kv_rows = unit_rows(block, units, True), unit_rows(block, units, False)
    _select(block.linear(lay.query), out_index=q_rows)
    _select(block.linear(lay.key), out_index=kv_rows)
    _select(block.linear(lay.value), out_index=kv_rows)
    _select(block.linear(lay.attn_out), in_index=q_rows)


def select_neurons(block: Block, neurons: list[int]) -> None:
    """Keep (or reorder) FFN neurons: rows of the up (and gate) projections, columns of the down projection."""
    index = torch.as_tensor(neurons, dtype=torch.long)
    for rel in block.layout.ffn_in:
        _select(block.linear(rel), out_index=index)
    _select(block.linear(block.layout.ffn_out), in_index=index)


def remove_adapter(model: nn.Module, name: str) -> None:
    parent, child = _parent(model, name)
    layer = getattr(parent, child)
    if isinstance(layer, AdapterLayer):
        setattr(parent, child, layer.base_layer)


@torch.no_grad()
def apply_plan(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """Physically slice ``model`` (built as the original) to ``plan``; returns it."""
    for block in blocks(model):
        if block.index in plan.heads:
            select_units(block, plan.heads[block.index])
        if block.index in plan.neurons:
            select_neurons(block, plan.neurons[block.index])
    for name in plan.removed_adapters:
        remove_adapter(model, name)
    for name, ranks in plan.ranks.items():
        model.get_submodule(name).keep_ranks(torch.as_tensor(ranks, dtype=torch.long))
    if plan.embedding_rank is not None:
        # On a freshly built model (resume, export reload) this creates the factorised shapes from the
        # original embedding; the state dict then loads the trained factors.
        from lightmods.structure.embedding import factorize_embedding

        factorize_embedding(model, plan.embedding_rank)
    return model
