"""EViT token reorganisation (Liang et al., ICLR 2022) on transformers' ViT.

In a reorganising layer, after multi-head self-attention (and its residual) and before the FFN, the image
tokens are ranked by the attention the [CLS] token pays them, averaged over heads. The top
``ceil(keep_rate * n)`` of the ``n`` non-[CLS] tokens are kept; the others ("inattentive") are fused into
one extra token, ``sum_i a_i x_i`` over them with ``a_i`` their [CLS] attention (the official code's sum;
``fuse_normalize`` divides by ``sum_i a_i`` for a true weighted mean). The FFN and every later layer then
run on ``1 + kept (+ 1)`` tokens: a real shortening, so a real speed-up. A fused token from an earlier
layer is an ordinary token for later ones. No parameters are added.

:class:`EViTLayer` is a ``ViTLayer`` that adopts the original layer's submodules, so its parameter names,
state dict, gradient checkpointing and hidden-state capture stay those of the plain model. With nothing to
drop (keep rate 1) it computes exactly what the original layer computes.

The [CLS] row of the attention probabilities comes from the attention function when it returns them
(``eager``, after attention dropout, as the official code); SDPA and flash kernels do not, so the layer
computes that single row itself (``softmax(q_cls k^T * scale)``: one query, cheap), before dropout.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.vit.modeling_vit import ViTAttention, ViTLayer, eager_attention_forward


def kept_tokens(n: int, keep_rate: float) -> int:
    """How many of ``n`` image tokens a layer keeps: ``ceil(keep_rate * n)``, at least one (a tiny epsilon
    keeps float noise such as ``0.7 * 10 = 7.000000000000001`` from adding a token)."""
    return max(1, min(n, math.ceil(keep_rate * n - 1e-9)))


def default_layers(depth: int) -> list[int]:
    """The paper's placement scaled to the depth: 0-based layers ``depth/4, depth/2, 3*depth/4`` (for 12
    layers 3, 6, 9, i.e. DeiT-S's blocks 4, 7 and 10)."""
    return sorted({(k * depth) // 4 for k in (1, 2, 3)})


def token_counts(num_patches: int, depth: int, layers: list[int], keep_rate: float, fuse: bool = True) -> list[int]:
    """Sequence length (with [CLS] and a fused token) leaving each of the ``depth`` layers."""
    n, out = num_patches, []
    for i in range(depth):
        if i in layers:
            keep = kept_tokens(n, keep_rate)
            if keep < n:
                n = keep + (1 if fuse else 0)
        out.append(n + 1)
    return out


def cls_attention(attn: ViTAttention, hidden: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``attn``'s output for ``hidden`` and the [CLS] token's attention over all tokens, averaged over
    heads (``batch x tokens``). The projections and the attention implementation are the module's own."""
    input_shape = hidden.shape[:-1]
    shape = (*input_shape, -1, attn.head_dim)
    q = attn.q_proj(hidden).view(shape).transpose(1, 2)
    k = attn.k_proj(hidden).view(shape).transpose(1, 2)
    v = attn.v_proj(hidden).view(shape).transpose(1, 2)
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager_attention_forward)
    out, weights = interface(
        attn, q, k, v, None, dropout=attn.attention_dropout if attn.training else 0.0, scaling=attn.scaling, **kwargs
    )
    out = attn.o_proj(out.reshape(*input_shape, -1).contiguous())
    if weights is not None:
        row = weights[:, :, 0]
    else:  # SDPA / flash kernels return no probabilities: the [CLS] row only
        scores = torch.matmul(q[:, :, :1], k.transpose(2, 3)) * attn.scaling
        row = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)[:, :, 0]
    return out, row.mean(dim=1)


def reorganize(x: torch.Tensor, cls_attn: torch.Tensor, keep: int, fuse: bool = True, normalize: bool = False) -> torch.Tensor:
    """``[CLS] + the keep most attended image tokens (most attended first) + the fused rest``.

    ``x``: ``batch x (1 + n) x dim``; ``cls_attn``: ``batch x n``, the [CLS] attention of the image tokens.
    """
    dim = x.shape[-1]
    order = torch.argsort(cls_attn, dim=1, descending=True, stable=True)
    image = x[:, 1:]
    kept_idx = order[:, :keep]
    parts = [x[:, :1], image.gather(1, kept_idx.unsqueeze(-1).expand(-1, -1, dim))]
    if fuse and keep < image.shape[1]:
        drop_idx = order[:, keep:]
        dropped = image.gather(1, drop_idx.unsqueeze(-1).expand(-1, -1, dim))
        weights = cls_attn.gather(1, drop_idx)
        if normalize:
            weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
        parts.append((dropped * weights.unsqueeze(-1).to(dropped.dtype)).sum(dim=1, keepdim=True))
    return torch.cat(parts, dim=1)


class EViTLayer(ViTLayer):
    """A ViT layer that reorganises its tokens after attention (see the module docstring).

    ``keep_rate`` is the target, used in evaluation; during training a schedule may set ``train_keep_rate``
    (:func:`set_train_keep_rate`). ``last_tokens`` is the sequence length this layer passed on last time.
    """

    def __init__(self, layer: ViTLayer, keep_rate: float, fuse: bool = True, fuse_normalize: bool = False):
        nn.Module.__init__(self)
        for name, child in layer.named_children():  # the same modules, so the same parameter names
            self.add_module(name, child)
        self.gradient_checkpointing = layer.gradient_checkpointing
        if hasattr(layer, "_gradient_checkpointing_func"):
            self._gradient_checkpointing_func = layer._gradient_checkpointing_func
        self.keep_rate = keep_rate
        self.fuse = fuse
        self.fuse_normalize = fuse_normalize
        self.train_keep_rate: float | None = None
        self.last_tokens: int | None = None

    def extra_repr(self) -> str:
        return f"keep_rate={self.keep_rate}, fuse={self.fuse}, fuse_normalize={self.fuse_normalize}"

    def current_keep_rate(self) -> float:
        return self.train_keep_rate if self.training and self.train_keep_rate is not None else self.keep_rate

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        n = hidden_states.shape[1] - 1
        keep = kept_tokens(n, self.current_keep_rate())
        residual = hidden_states
        hidden_states = self.layernorm_before(hidden_states)
        if keep < n:
            if attention_mask is not None:
                raise ValueError("EViT shortens the token sequence; an attention mask over the original tokens does not apply")
            hidden_states, cls_attn = cls_attention(self.attention, hidden_states, **kwargs)
        else:  # nothing to drop: the original layer's computation
            hidden_states, _ = self.attention(hidden_states, attention_mask, **kwargs)
        hidden_states = self.dropout(hidden_states) + residual
        if keep < n:
            hidden_states = reorganize(hidden_states, cls_attn[:, 1:], keep, self.fuse, self.fuse_normalize)

        residual = hidden_states
        hidden_states = self.layernorm_after(hidden_states)
        hidden_states = self.mlp(hidden_states)
        hidden_states = self.dropout(hidden_states) + residual
        self.last_tokens = hidden_states.shape[1]
        return hidden_states


def vit_layer_list(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of ``ViTLayer`` blocks of a transformers ViT model."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(isinstance(m, ViTLayer) for m in module):
            return module
    raise ValueError(f"{type(model).__name__} has no list of ViTLayer blocks")


def wrap_vit_layers(model: nn.Module, layers: list[int], keep_rate: float, fuse: bool = True, fuse_normalize: bool = False) -> list[int]:
    """Make the layers at 0-based ``layers`` reorganise tokens (in place; the weights stay where they are).
    An already wrapped layer gets the new settings. Returns the wrapped indices."""
    blocks = vit_layer_list(model)
    for i in layers:
        layer = blocks[i]
        if isinstance(layer, EViTLayer):
            layer.keep_rate, layer.fuse, layer.fuse_normalize = keep_rate, fuse, fuse_normalize
        else:
            blocks[i] = EViTLayer(layer, keep_rate, fuse, fuse_normalize)
    return sorted(layers)


def evit_layers(model: nn.Module) -> list[EViTLayer]:
    return [m for m in model.modules() if isinstance(m, EViTLayer)]


def set_train_keep_rate(model: nn.Module, rate: float | None) -> None:
    """The keep rate the reorganising layers use in training mode (None: their target)."""
    for layer in evit_layers(model):
        layer.train_keep_rate = rate
