"""A pruning decision as data: which attention units, FFN neurons, adapter modules and adapter ranks stay,
(optionally) the rank of a low-rank factorised word embedding, and (optionally) which hidden (residual-stream)
channels stay.

Indices always refer to the *original* model, so a plan applies to a freshly built model (resume, export
reload) and plans of successive pruning rounds compose with :meth:`PruningPlan.then`. An index list that is
a permutation of all indices reorders instead of pruning (S2FT's co-permutation uses the same path).

Hidden channels (``hidden``, PAT, WID, mask pruning): ``apply_plan`` slices every place the residual width
lives (see ``lightmods/structure/hidden.py`` for the list): embeddings, q/k/v and FFN-in input columns,
attention-out and FFN-out rows, block norms, the final/embedding norm, the heads' input columns (tied
embeddings stay tied); key/value widths and the KV cache are unchanged, ``model.config`` still describes the
original model. What is exact:

- RMS-norm (pre-norm, LLaMA-style) models: if the removed channels are exactly zero in the residual stream
  (zero embedding columns and zero attention-out / FFN-out rows on them, adapters included), the model sliced
  with ``rescale_rms=True`` gives the same outputs (RMS-norm weights times ``sqrt(d/d')``, epsilon times
  ``d/d'``: the mean of squares over ``d'`` channels is ``d/d'`` times the one over ``d``).
- LayerNorm (post-norm BERT/RoBERTa) models: the sliced model equals the original one in which every
  LayerNorm computes its mean and variance over the kept channels only and outputs zero on the removed
  ones (its weight and bias zero there), i.e. the residual stream is zero on the removed channels at every
  place it is produced (the embedding and block LayerNorms). A plain channel mask does not give that: a
  LayerNorm over all channels mixes the removed ones into its statistics. ``rescale_rms`` does nothing here.
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
    embedding_vocab: list[int] | None = None  # token ids that keep an embedding row (TrimmedEmbedding); None: all
    # with embedding_vocab: the id whose row every other id reads, or per token id the id whose row it reads
    embedding_fallback: int | list[int] | None = None
    hidden: list[int] | None = None  # kept residual channels; None: the hidden width is untouched
    rescale_rms: bool = False  # with ``hidden``: RMS norms rescaled so zero-channel removal is exact

    def to_dict(self) -> dict:
        d = {
            "heads": {str(k): list(map(int, v)) for k, v in self.heads.items()},
            "neurons": {str(k): list(map(int, v)) for k, v in self.neurons.items()},
            "removed_adapters": list(self.removed_adapters),
            "ranks": {k: list(map(int, v)) for k, v in self.ranks.items()},
        }
        if self.embedding_rank is not None:  # only when set: plans without it read and compare as before
            d["embedding_rank"] = int(self.embedding_rank)
        if self.embedding_vocab is not None:  # likewise
            d["embedding_vocab"] = list(map(int, self.embedding_vocab))
            fb = self.embedding_fallback
            d["embedding_fallback"] = list(map(int, fb)) if isinstance(fb, (list, tuple)) else int(fb)
        if self.hidden is not None:  # likewise only when set
            d["hidden"] = list(map(int, self.hidden))
            d["rescale_rms"] = bool(self.rescale_rms)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PruningPlan:
        return cls(
            heads={int(k): list(v) for k, v in d.get("heads", {}).items()},
            neurons={int(k): list(v) for k, v in d.get("neurons", {}).items()},
            removed_adapters=list(d.get("removed_adapters", [])),
            ranks={k: list(v) for k, v in d.get("ranks", {}).items()},
            embedding_rank=d.get("embedding_rank"),
            embedding_vocab=list(d["embedding_vocab"]) if d.get("embedding_vocab") is not None else None,
            embedding_fallback=d.get("embedding_fallback"),
            hidden=list(d["hidden"]) if d.get("hidden") is not None else None,
            rescale_rms=bool(d.get("rescale_rms", False)),
        )

    def then(self, later: PruningPlan) -> PruningPlan:
        """This plan followed by ``later`` (whose indices refer to the model this plan produced)."""

        def chain(first: dict, second: dict) -> dict:
            out = dict(first)
            for k, idx in second.items():
                out[k] = [first[k][i] for i in idx] if k in first else list(idx)
            return out

        if self.hidden is not None and later.hidden is not None and self.rescale_rms != later.rescale_rms:
            raise ValueError("cannot compose hidden-channel plans with and without RMS-norm rescaling")
        if later.hidden is None:
            hidden, rescale = self.hidden, self.rescale_rms
        else:
            hidden = [self.hidden[i] for i in later.hidden] if self.hidden is not None else list(later.hidden)
            rescale = later.rescale_rms
        return PruningPlan(
            heads=chain(self.heads, later.heads),
            neurons=chain(self.neurons, later.neurons),
            removed_adapters=sorted({*self.removed_adapters, *later.removed_adapters}),
            ranks=chain(
                {k: v for k, v in self.ranks.items() if k not in later.removed_adapters}, later.ranks
            ),
            embedding_rank=later.embedding_rank if later.embedding_rank is not None else self.embedding_rank,
            # token ids, not indices: a later trimming replaces an earlier one
            embedding_vocab=later.embedding_vocab if later.embedding_vocab is not None else self.embedding_vocab,
            embedding_fallback=(
                later.embedding_fallback if later.embedding_vocab is not None else self.embedding_fallback
            ),
            hidden=hidden,
            rescale_rms=rescale,
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
    if plan.embedding_vocab is not None:  # the factorised (or plain) rows of the kept ids; see TrimmedEmbedding
        from lightmods.structure.embedding import trim_vocabulary

        trim_vocabulary(model, plan.embedding_vocab, plan.embedding_fallback)
    if plan.hidden is not None:  # after the factorisation: its projection's rows are hidden channels
        from lightmods.structure.hidden import select_hidden

        select_hidden(model, plan.hidden, rescale_rms=plan.rescale_rms)
    return model
