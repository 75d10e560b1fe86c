"""Hidden-channel (residual-stream) slicing: keep (or reorder) channels of the width every block reads and
writes, wherever the family's :class:`~lightmods.structure.spec.BlockLayout` says that width lives.

Sliced together, for kept channels ``keep`` (indices of the model as it is now):

- embedding tables (word/position/token-type columns, ``embed_tokens``; a factorised embedding's projection
  rows), tied output embeddings (``lm_head`` sharing the word embedding) stay tied;
- per block: input columns of q/k/v and of the FFN-in projections, output rows (+ bias) of the attention
  output and FFN-out projections, the block norms;
- norms outside the blocks (BERT's embedding LayerNorm, LLaMA's final norm);
- heads that read the last hidden state (BERT's pooler dense, RoBERTa's classification head, ``score``,
  ``lm_head``, ``qa_outputs``, exit classifiers): input columns only.

Adapter layers follow through their ``select_features`` (LoRA: ``A`` columns on the input side, ``B`` rows on
the output side). Key/value widths, heads, FFN neurons and ``model.config`` are left as they are: the config
keeps describing the original model (``FlopsProfile.from_config``), the current width is read from the
modules (:func:`hidden_width`).

Norms. ``LayerNorm`` keeps its kept entries and normalises over the kept channels only. An RMS norm
(``LlamaRMSNorm`` and relatives, ``nn.RMSNorm``) keeps its kept weights; with ``rescale_rms`` the weights are
multiplied by ``sqrt(d / d')`` and its epsilon by ``d / d'`` (``d`` channels before, ``d'`` after). When the
removed channels of the norm's input are exactly zero, ``mean(x^2)`` over ``d'`` channels is ``d / d'`` times
the mean over ``d``, so with both factors the normalised kept channels are identical (PAT's merge rescales the
weights; rescaling epsilon as well removes the last, ``eps``-sized difference).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lightmods.peft.inject import match_module
from lightmods.peft.layer import AdapterLayer, derive_parameter, select_linear
from lightmods.structure.embedding import FactorizedEmbedding, TrimmedEmbedding
from lightmods.structure.plan import _select
from lightmods.structure.spec import COMMON_STREAM_READERS, blocks, layout_of


def hidden_width(model: nn.Module) -> int:
    """The residual width of ``model`` as it is now (the input width of the first block's query)."""
    first = blocks(model)[0]
    return first.linear(first.layout.query).in_features


@torch.no_grad()
def select_norm(norm: nn.Module, index: torch.Tensor, rescale_rms: bool = False) -> None:
    """Keep the entries ``index`` of a LayerNorm or RMS norm over the hidden width (see the module notes)."""
    if isinstance(norm, nn.LayerNorm):
        norm.weight = derive_parameter(norm.weight, 0, index) if norm.weight is not None else None
        norm.bias = derive_parameter(norm.bias, 0, index) if norm.bias is not None else None
        norm.normalized_shape = (len(index),)
        return
    weight = getattr(norm, "weight", None)
    is_rms = isinstance(norm, nn.RMSNorm) or hasattr(norm, "variance_epsilon")
    if not is_rms or weight is None or weight.dim() != 1:
        raise TypeError(f"cannot slice the hidden width of a {type(norm).__name__} (LayerNorm or RMS norms only)")
    d, d_new = weight.shape[0], len(index)
    norm.weight = derive_parameter(weight, 0, index)
    if isinstance(norm, nn.RMSNorm):
        norm.normalized_shape = (d_new,)
    if rescale_rms and d_new != d:
        norm.weight.mul_(math.sqrt(d / d_new))
        if isinstance(norm, nn.RMSNorm):
            eps = norm.eps if norm.eps is not None else torch.finfo(weight.dtype).eps
            norm.eps = eps * d / d_new
        else:
            norm.variance_epsilon = norm.variance_epsilon * d / d_new


def _select_embedding(emb: nn.Module, index: torch.Tensor) -> None:
    if isinstance(emb, TrimmedEmbedding):
        _select_embedding(emb.inner, index)
    elif isinstance(emb, FactorizedEmbedding):
        select_linear(emb.proj, out_index=index)
    elif isinstance(emb, nn.Embedding):
        emb.weight = derive_parameter(emb.weight, 1, index)
    else:
        raise TypeError(f"cannot slice the hidden width of a {type(emb).__name__}")
    emb.embedding_dim = len(index)


def stream_readers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Linear heads of ``model`` that read its last hidden state (and exit heads that read a layer's)."""
    patterns = (*layout_of(model).stream_readers, *COMMON_STREAM_READERS)
    return [
        (name, m)
        for name, m in model.named_modules()
        if name and match_module(name, patterns) and isinstance(m, (nn.Linear, AdapterLayer))
        and not name.endswith(".base_layer")
    ]


@torch.no_grad()
def select_hidden(model: nn.Module, keep: list[int], rescale_rms: bool = False) -> nn.Module:
    """Keep (or reorder) the hidden channels ``keep`` of ``model`` in place; returns it."""
    model_blocks = blocks(model)
    layout = model_blocks[0].layout
    width = hidden_width(model)
    index = torch.as_tensor(list(keep), dtype=torch.long)
    if index.numel() == 0 or len(set(index.tolist())) != index.numel() or int(index.min()) < 0 or int(index.max()) >= width:
        raise ValueError(f"hidden channels to keep must be distinct indices in [0, {width}); got {len(keep)} of them")
    base = getattr(model, "base_model", model)
    embeddings = [base.get_submodule(rel) for rel in layout.embeddings]
    tables = {id(e.weight): e for e in embeddings if isinstance(e, nn.Embedding)}
    for _, reader in stream_readers(model):
        if id(reader.weight) not in tables:  # a tied output embedding follows its table below
            _select(reader, in_index=index)
    for block in model_blocks:
        for rel in (layout.query, layout.key, layout.value, *layout.ffn_in):
            _select(block.linear(rel), in_index=index)
        for rel in (layout.attn_out, layout.ffn_out):
            _select(block.linear(rel), out_index=index)
        for rel in layout.norms:
            select_norm(block.linear(rel), index, rescale_rms)
    old_tables = {id(e.weight): e.weight for e in embeddings if isinstance(e, nn.Embedding)}
    for emb in embeddings:
        _select_embedding(emb, index)
    for rel in layout.base_norms:
        select_norm(base.get_submodule(rel), index, rescale_rms)
    _retie(model, old_tables, {id_: tables[id_].weight for id_ in old_tables})
    return model


def _retie(model: nn.Module, old: dict[int, nn.Parameter], new: dict[int, nn.Parameter]) -> None:
    """Modules that shared an embedding table's weight (tied output embeddings) share the sliced one."""
    for m in model.modules():
        w = m._parameters.get("weight") if hasattr(m, "_parameters") else None
        if w is not None and id(w) in old and w is old[id(w)]:
            m.weight = new[id(w)]
            if isinstance(m, nn.Linear):
                m.in_features = new[id(w)].shape[1]
