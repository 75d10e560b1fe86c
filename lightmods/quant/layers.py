"""Quantized layers that wrap and keep their base ``nn.Linear`` / ``nn.Embedding`` (as ``base_layer``, like the
adapter layers of ``lightmods.peft``): the base weight stays the full-precision latent weight that training
updates; the forward pass uses its quantized copy ``Q(W)``. Injection by module-name pattern reuses
``lightmods.peft.inject``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lightmods.peft.inject import _parent, inject_adapters
from lightmods.peft.layer import LinearShape
from lightmods.quant.quantizer import WeightQuantizer


class QuantLayer(nn.Module):
    """Shared part: the wrapped layer and its quantizer (a tied output layer shares its input embedding's)."""

    def __init__(self, base_layer: nn.Module, quantizer: WeightQuantizer):
        super().__init__()
        self.base_layer = base_layer
        self.quantizer = quantizer

    @property
    def weight(self) -> torch.Tensor:
        """The latent full-precision weight (for code that inspects ``module.weight``)."""
        return self.base_layer.weight

    @property
    def bits(self) -> int:
        return self.quantizer.bits

    def quantized_weight(self) -> torch.Tensor:
        return self.quantizer(self.base_layer.weight)

    def codes(self) -> torch.Tensor:
        return self.quantizer.codes(self.base_layer.weight)


class QuantLinear(LinearShape, QuantLayer):
    """``y = x Q(W)^T + b``."""

    def __init__(self, base_layer: nn.Linear, quantizer: WeightQuantizer):
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"QuantLinear wraps nn.Linear, got {type(base_layer).__name__}")
        super().__init__(base_layer, quantizer)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight(), self.base_layer.bias)


class QuantEmbedding(QuantLayer):
    """A lookup into ``Q(E)``."""

    def __init__(self, base_layer: nn.Embedding, quantizer: WeightQuantizer):
        if not isinstance(base_layer, nn.Embedding):
            raise TypeError(f"QuantEmbedding wraps nn.Embedding, got {type(base_layer).__name__}")
        super().__init__(base_layer, quantizer)

    @property
    def num_embeddings(self) -> int:
        return self.base_layer.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.base_layer.embedding_dim

    @property
    def padding_idx(self) -> int | None:
        return self.base_layer.padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.base_layer
        return F.embedding(ids, self.quantized_weight(), e.padding_idx, e.max_norm, e.norm_type, e.scale_grad_by_freq, e.sparse)


def quant_layers(model: nn.Module) -> Iterator[tuple[str, QuantLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, QuantLayer):
            yield name, module


def quantize_linears(
    model: nn.Module, patterns: Sequence[str], exclude: Sequence[str], bits: int, scale_init: str, learn_scale: bool
) -> list[str]:
    """Swap every ``nn.Linear`` matching ``patterns`` (not ``exclude``) for a :class:`QuantLinear`."""

    def factory(linear: nn.Linear) -> QuantLinear:
        return QuantLinear(linear, WeightQuantizer(linear.weight, bits, scale_init, learn_scale))

    return inject_adapters(model, patterns, factory, exclude=exclude, key="method.target_modules")


def quantize_embeddings(model: nn.Module, bits: int, scale_init: str, learn_scale: bool) -> list[str]:
    """Quantize the word embedding (``get_input_embeddings``); an output layer tied to it (a causal LM's
    ``lm_head``) is wrapped with the same quantizer, so both read the same codes. Returns the wrapped names."""
    emb = model.get_input_embeddings()
    if not isinstance(emb, nn.Embedding):
        return []
    names = {id(m): n for n, m in model.named_modules()}
    quantizer = WeightQuantizer(emb.weight, bits, scale_init, learn_scale)
    wrapped = []
    parent, child = _parent(model, names[id(emb)])
    setattr(parent, child, QuantEmbedding(emb, quantizer))
    wrapped.append(names[id(emb)])
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(out, nn.Linear) and out.weight is emb.weight:
        parent, child = _parent(model, names[id(out)])
        setattr(parent, child, QuantLinear(out, quantizer))
        wrapped.append(names[id(out)])
    return wrapped
