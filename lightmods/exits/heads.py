"""Multi-exit heads on any supported encoder, attached with forward hooks (no modified modeling code).

An exit after transformer layer ``k`` (1-based, ``start <= k < L``) is COST-EFF's highway classifier,
``logits_k = W_k dropout(tanh(h_k[:, 0])) + b_k`` (or the mean over non-padding tokens instead of the first
token: ``pooling="mean"``); the model's own classification head is exit ``L``. Each
forward of the hooked model leaves, on the :class:`MultiExitHeads` module, the exit logits of that pass
(``logits[k]``), the hidden states (``hidden[0]`` = embedding output, ``hidden[k]`` = output of layer ``k``)
and the final logits, for the losses and the per-exit metrics to read.

Gradient equilibrium (Li et al. 2019, as COST-EFF's ``GradRescale``): while gradients flow, the output of a
layer ``k`` with an exit is scaled by ``1/(L-k+1)`` before its exit and the deeper path's gradient by
``L-k`` after it, so the gradient reaching layer ``k`` is ``(g_exit_k + (L-k) g_deeper) / (L-k+1)``. Layers
below ``start`` have no exit and pass gradients unchanged. Forward values are never changed.
"""

from __future__ import annotations

import torch
from torch import nn

from lightmods.errors import ConfigError

EXITS_ATTR = "exit_heads"
EXIT_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "camembert")


class GradRescale(torch.autograd.Function):
    """Identity forward; the backward gradient is multiplied by ``scale``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def grad_rescale(x: torch.Tensor, scale: float) -> torch.Tensor:
    if scale == 1 or not (torch.is_grad_enabled() and x.requires_grad):
        return x
    return GradRescale.apply(x, scale)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (natural log) of the softmax of ``logits`` over the last dimension."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


POOLINGS = ("cls", "mean")


class ExitHead(nn.Module):
    """``Linear(dropout(tanh(pool(h))))``: the official ``CosteffHighway`` (``pooling_mode`` ``cls``, its default,
    or ``avg``: the mean over non-padding tokens)."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float = 0.1, pooling: str = "cls"):
        super().__init__()
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(hidden_size, num_labels)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        elif mask is None:
            pooled = hidden.mean(1)
        else:
            m = mask[:, : hidden.shape[1], None].to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1)
        return self.linear(self.dropout(torch.tanh(pooled)))


class _ExitHook:
    """A forward hook that knows its heads module. A plain object, so ``copy.deepcopy`` of a model rebinds
    the copy's hooks to the copy's heads (``heads`` is deep-copied through the same memo)."""

    def __init__(self, heads: MultiExitHeads, kind: str, index: int = 0):
        self.heads, self.kind, self.index = heads, kind, index

    def __call__(self, module, args, *rest):
        if self.kind == "inputs":  # forward pre-hook with kwargs: remember the padding mask
            kwargs = rest[0]
            mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
            self.heads.mask = mask if self.heads.capture else None
            return None
        return self.heads._on_output(self.kind, self.index, rest[0])


class MultiExitHeads(nn.Module):
    """Exit classifiers after layers ``start .. L-1``; the model's own head is exit ``L``."""

    def __init__(
        self, num_layers: int, hidden_size: int, num_labels: int, start: int = 1, dropout: float = 0.1,
        grad_rescale: bool = True, pooling: str = "cls",
    ):  # fmt: skip
        super().__init__()
        if not 1 <= start <= num_layers:
            raise ConfigError(f"exits.start={start} is not accepted; accepted: a layer in 1..{num_layers}")
        self.num_layers, self.start, self.grad_rescale = num_layers, start, grad_rescale
        if pooling not in POOLINGS:
            raise ConfigError(
                f"exits.pooling={pooling!r} is not accepted; accepted: one of {', '.join(POOLINGS)}"
            )
        self.heads = nn.ModuleDict(
            {str(k): ExitHead(hidden_size, num_labels, dropout, pooling) for k in range(start, num_layers)}
        )
        self.capture = True  # the early-exit runner turns this off: it calls the heads itself
        self.mask: torch.Tensor | None = None  # the padding mask of the current forward (mean pooling)
        self.clear()

    # ---- what one forward pass leaves behind -------------------------------------------------------------
    def clear(self) -> None:
        self.logits: dict[int, torch.Tensor] = {}
        self.hidden: list[torch.Tensor] = []
        self.final_logits: torch.Tensor | None = None

    @property
    def exit_layers(self) -> list[int]:
        """1-based layers with an exit, the final classifier (layer ``L``) included."""
        return [*range(self.start, self.num_layers), self.num_layers]

    def head(self, layer: int) -> ExitHead:
        return self.heads[str(layer)]

    def all_logits(self) -> dict[int, torch.Tensor]:
        """Exit logits of the last pass, the final classifier's as exit ``L``."""
        out = dict(self.logits)
        if self.final_logits is not None:
            out[self.num_layers] = self.final_logits
        return out

    def _on_output(self, kind: str, index: int, output):
        if not self.capture:
            return None
        if kind == "embeddings":
            self.clear()
            self.hidden.append(output)
            return None
        if kind == "model":
            self.final_logits = getattr(output, "logits", None)
            return None
        h = output[0] if isinstance(output, tuple) else output
        k, n = index + 1, self.num_layers  # 1-based layer
        has_exit = self.start <= k < n
        if has_exit and self.grad_rescale:
            h = grad_rescale(h, 1.0 / (n - k + 1))
        self.hidden.append(h)
        if not has_exit:
            return None
        self.logits[k] = self.head(k)(h, self.mask)
        if self.grad_rescale:
            h = grad_rescale(h, float(n - k))
        return (h, *output[1:]) if isinstance(output, tuple) else h

    # ---- hooks --------------------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        from lightmods.structure.spec import blocks

        self.detach_hooks(model)
        model.register_forward_pre_hook(_ExitHook(self, "inputs"), with_kwargs=True)
        model.base_model.embeddings.register_forward_hook(_ExitHook(self, "embeddings"))
        for i, block in enumerate(blocks(model)):
            block.module.register_forward_hook(_ExitHook(self, "layer", i))
        model.register_forward_hook(_ExitHook(self, "model"))

    def detach_hooks(self, model: nn.Module) -> None:
        for m in model.modules():
            for hooks in (m._forward_hooks, m._forward_pre_hooks):
                for key, hook in list(hooks.items()):
                    if isinstance(hook, _ExitHook) and hook.heads is self:
                        del hooks[key]
                        m._forward_pre_hooks_with_kwargs.pop(key, None)


def check_exit_model(model: nn.Module) -> None:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in EXIT_MODEL_TYPES:
        raise ConfigError(
            f"exits: model_type={model_type!r} is not supported; accepted: {', '.join(EXIT_MODEL_TYPES)} (encoders)"
        )


def attach_exits(
    model: nn.Module, start: int = 1, dropout: float = 0.1, grad_rescale: bool = True, pooling: str = "cls"
) -> MultiExitHeads:
    """Add exit heads after layers ``start .. L-1`` of an HF sequence classifier (trainable; same device and
    dtype as the model) as ``model.exit_heads``, hooked into its forward."""
    check_exit_model(model)
    cfg = model.config
    heads = MultiExitHeads(
        cfg.num_hidden_layers, cfg.hidden_size, cfg.num_labels, start, dropout, grad_rescale, pooling
    )
    ref = next(model.parameters())
    heads.to(device=ref.device, dtype=ref.dtype)
    setattr(model, EXITS_ATTR, heads)
    heads.attach(model)
    return heads


def get_exits(model: nn.Module) -> MultiExitHeads | None:
    return getattr(model, EXITS_ATTR, None)
