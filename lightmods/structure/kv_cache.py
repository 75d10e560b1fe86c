"""KV-cache size of a decoder as it is now: what pruning attention units (TransAct, mask pruning) or hidden
channels (PAT keeps key/value widths) saves at generation time."""

from __future__ import annotations

from torch import nn

from lightmods.structure.spec import blocks


def kv_cache_bytes_per_token(model: nn.Module, bytes_per_value: int | None = None) -> int:
    """Bytes one cached token takes over all layers: ``sum_l 2 * width(k_proj_l)`` values (keys and values),
    ``bytes_per_value`` each (default: the model's parameter dtype size)."""
    if bytes_per_value is None:
        bytes_per_value = next(model.parameters()).element_size()
    width = sum(2 * b.linear(b.layout.key).out_features for b in blocks(model))
    return int(width * bytes_per_value)


def kv_cache_bytes(model: nn.Module, seq_len: int, batch_size: int = 1, bytes_per_value: int | None = None) -> int:
    """Bytes of the KV cache for ``batch_size`` sequences of ``seq_len`` tokens."""
    return kv_cache_bytes_per_token(model, bytes_per_value) * int(seq_len) * int(batch_size)
