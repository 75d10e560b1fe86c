"""A trainable gate over the hidden (residual-stream) dimension, shared by every layer (mask-based pruning).

One vector ``m`` of ``hidden_size`` gates acts wherever the residual width lives, with hooks (no modified
modeling code), so that a model whose gates are exactly 0/1 computes what the model with the 0-gated
channels physically removed (``PruningPlan.hidden``) computes:

- post-norm encoders (BERT/RoBERTa): the residual stream is the output of the embedding LayerNorm and of the
  two LayerNorms of each block; those outputs are multiplied by ``m``;
- pre-norm decoders (LLaMA-style): the stream is the sum of what the token embedding, each attention output
  projection and each FFN down projection write; those outputs are multiplied by ``m``;
- every norm over the hidden dimension computes its statistics weighted by ``|m|``: LayerNorm
  ``mu = sum(w x) / sum(w)``, ``var = sum(w (x - mu)^2) / sum(w)``; RMSNorm ``ms = sum(w x^2) / sum(w)``.
  With 0/1 gates these are the statistics over the kept channels, i.e. those of the sliced norm (no
  rescaling of norm weights needed); with all gates 1 they are the ordinary ones.

Input columns of q/k/v, of the FFN input projections and of the task head then only ever see zeros in the
gated-off channels, and the rows of the output projections only write into channels that are zeroed (or
ignored by the norm statistics and zeroed after it), so slicing them away changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lightmods.structure.spec import blocks

_EPS = 1e-12
POST_NORM_FAMILIES = ("bert", "roberta")  # a LayerNorm after each residual add: its output is the stream


@dataclass
class HiddenSites:
    """The modules a hidden gate hooks: ``writers`` (outputs multiplied by the gate) and ``norms`` (statistics
    weighted by the gate; outputs multiplied by it too when ``mask_norm_outputs``, the post-norm case)."""

    writers: list[nn.Module] = field(default_factory=list)
    norms: list[nn.Module] = field(default_factory=list)
    mask_norm_outputs: bool = False


def hidden_sites(model: nn.Module) -> HiddenSites:
    """Where the hidden width lives in ``model``, from its block layout (``norms``, ``base_norms``,
    ``embeddings``): post-norm encoders (BERT/RoBERTa) gate their norm outputs, pre-norm decoders
    (LLaMA-style) the embedding and the attention/FFN output projections."""
    from lightmods.structure.spec import layout_of

    layout = layout_of(model)
    model_blocks = blocks(model)
    base = model.base_model
    norms = [base.get_submodule(n) for n in layout.base_norms]
    for b in model_blocks:
        norms += [b.module.get_submodule(n) for n in layout.norms]
    if not norms:
        from lightmods.errors import ConfigError

        raise ConfigError(f"the {model.config.model_type} block layout names no norms over the hidden width")
    from lightmods.models.families import family_of

    if family_of(model).name in POST_NORM_FAMILIES:
        return HiddenSites(writers=[], norms=norms, mask_norm_outputs=True)
    writers = [base.get_submodule(n) for n in layout.embeddings]
    for b in model_blocks:
        writers += [b.linear(b.layout.attn_out), b.linear(b.layout.ffn_out)]
    return HiddenSites(writers=writers, norms=norms, mask_norm_outputs=False)


def weighted_norm(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``module`` (LayerNorm or RMSNorm) applied to ``x`` with its statistics weighted per channel by
    ``weight`` (>= 0), computed in float32 as the HF norms do."""
    w = weight.float()
    xf = x.float()
    denom = w.sum().clamp_min(_EPS)
    if isinstance(module, nn.LayerNorm):
        mean = (xf * w).sum(-1, keepdim=True) / denom
        var = ((xf - mean).pow(2) * w).sum(-1, keepdim=True) / denom
        y = (xf - mean) * torch.rsqrt(var + module.eps)
        if module.weight is not None:
            y = y * module.weight.float()
        if module.bias is not None:
            y = y + module.bias.float()
        return y.to(x.dtype)
    eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", None)
    if eps is None or not hasattr(module, "weight"):
        raise TypeError(f"{type(module).__name__} is neither a LayerNorm nor an RMSNorm")
    ms = (xf.pow(2) * w).sum(-1, keepdim=True) / denom
    y = xf * torch.rsqrt(ms + eps)
    return module.weight * y.to(x.dtype)


def attach_hidden_gate(gate: nn.Parameter, sites: HiddenSites) -> list:
    """Register the hooks of ``gate`` on ``sites``; returns their handles."""

    def scale_output(module, args, out):
        return out * gate.to(out.dtype)

    def norm_output(module, args, out):
        y = weighted_norm(module, args[0], gate.abs())
        return y * gate.to(y.dtype) if sites.mask_norm_outputs else y

    handles = [m.register_forward_hook(scale_output) for m in sites.writers]
    handles += [m.register_forward_hook(norm_output) for m in sites.norms]
    return handles
