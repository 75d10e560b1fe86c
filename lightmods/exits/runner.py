"""Early-exit inference: run the encoder layer by layer and let each sample leave at the first exit whose
prediction entropy is below the threshold.

Per-sample batch inference: after each exit the samples that left are dropped from the batch, and padding
columns no remaining sample needs are trimmed, so a batch costs what its samples cost. ``threshold <= 0``
never exits early (the entropy is never negative): the final classifier answers at layer ``L``;
``threshold = inf`` exits every sample at the first exit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lightmods.exits.heads import entropy, get_exits
from lightmods.structure.spec import blocks


@dataclass
class ExitResult:
    logits: torch.Tensor  # (batch, num_labels): the logits of the exit each sample took
    exit_layer: torch.Tensor  # (batch,) 1-based layer of that exit (L = the final classifier)
    lengths: torch.Tensor  # (batch,) non-padding tokens per sample (for FLOPs accounting)


def final_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The model's own classification head on the last hidden states (BERT: pooler, dropout, classifier;
    RoBERTa-style: the classification head reads the first token itself)."""
    base = model.base_model
    pooler = getattr(base, "pooler", None)
    if isinstance(getattr(model, "classifier", None), nn.Linear):
        pooled = pooler(hidden) if pooler is not None else hidden[:, 0]
        return model.classifier(model.dropout(pooled))
    return model.classifier(hidden)


def _mask(base: nn.Module, hidden: torch.Tensor, mask2d: torch.Tensor):
    from transformers.masking_utils import create_bidirectional_mask

    return create_bidirectional_mask(config=base.config, inputs_embeds=hidden, attention_mask=mask2d)


@torch.no_grad()
def early_exit_forward(model: nn.Module, batch: dict, threshold: float) -> ExitResult:
    """Logits and exit layer per sample for one batch (``input_ids``, optional ``attention_mask`` /
    ``token_type_ids``). The model must be in eval mode to match its deterministic forward."""
    heads = get_exits(model)
    base = model.base_model
    layers = [b.module for b in blocks(model)]
    n_layers = len(layers)
    ids = batch["input_ids"]
    mask2d = batch.get("attention_mask")
    if mask2d is None:
        mask2d = torch.ones_like(ids)
    lengths = mask2d.sum(-1)
    types = batch.get("token_type_ids")
    out_logits = torch.empty(ids.shape[0], model.config.num_labels, device=ids.device)
    out_layer = torch.full((ids.shape[0],), n_layers, dtype=torch.long, device=ids.device)
    active = torch.arange(ids.shape[0], device=ids.device)
    capture = heads.capture if heads is not None else None
    if heads is not None:
        heads.capture = False
    try:
        hidden = base.embeddings(input_ids=ids, token_type_ids=types)
        for i, layer in enumerate(layers):
            hidden = layer(hidden, _mask(base, hidden, mask2d))
            k = i + 1
            if k == n_layers:
                out_logits[active] = final_logits(model, hidden).float()
                break
            if threshold <= 0 or heads is None or k < heads.start:
                continue
            z = heads.head(k)(hidden, mask2d)
            done = entropy(z) < threshold
            if not bool(done.any()):
                continue
            out_logits[active[done]] = z[done].float()
            out_layer[active[done]] = k
            keep = ~done
            if not bool(keep.any()):
                break
            active, hidden, mask2d = active[keep], hidden[keep], mask2d[keep]
            width = int(mask2d.any(0).nonzero().max()) + 1  # trailing columns no remaining sample uses
            hidden, mask2d = hidden[:, :width], mask2d[:, :width]
    finally:
        if heads is not None:
            heads.capture = capture
    return ExitResult(out_logits, out_layer, lengths)
