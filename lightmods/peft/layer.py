"""The base every adapter layer shares: it wraps a frozen ``nn.Linear`` and keeps it as ``base_layer``."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn


def derive_parameter(old: nn.Parameter, dim: int, index: torch.Tensor) -> nn.Parameter:
    """A new parameter holding ``old`` indexed along ``dim``; it remembers the original parameter and the
    index steps from it, so optimizer state can follow structural surgery (see ``structure.surgery``)."""
    new = nn.Parameter(old.detach().index_select(dim, index.to(old.device)).clone(), requires_grad=old.requires_grad)
    root, steps = getattr(old, "_lm_origin", (old, ()))
    new._lm_origin = (root, (*steps, (dim, index.cpu())))
    return new


def select_linear(linear: nn.Linear, out_index: torch.Tensor | None = None, in_index: torch.Tensor | None = None) -> None:
    """Keep (or reorder) the output rows ``out_index`` and input columns ``in_index`` of ``linear`` in place."""
    if out_index is not None:
        linear.weight = derive_parameter(linear.weight, 0, out_index)
        if linear.bias is not None:
            linear.bias = derive_parameter(linear.bias, 0, out_index)
        linear.out_features = len(out_index)
    if in_index is not None:
        linear.weight = derive_parameter(linear.weight, 1, in_index)
        linear.in_features = len(in_index)


class LinearShape:
    """``in_features`` / ``out_features`` of the wrapped ``base_layer``, for modules that stand in for an
    ``nn.Linear`` (adapter, quantized and compacted layers)."""

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features


class AdapterLayer(LinearShape, nn.Module):
    """A trainable addition to a base linear layer.

    Subclasses implement :meth:`adapter_forward` (what the adapter adds to the base output) and, when the
    addition is linear in the input, :meth:`delta_weight` so that :meth:`merge` can fold it into the base
    weight. The base layer keeps its parameter names (``<name>.base_layer.weight``), as in HF PEFT.
    """

    mergeable: ClassVar[bool] = True

    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"{type(self).__name__} wraps nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.merged = False

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, for code that inspects ``module.weight`` (dtype and device checks)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def adapter_parameters(self) -> list[nn.Parameter]:
        """Parameters that belong to the adapter, not to the wrapped base layer."""
        base = {id(p) for p in self.base_layer.parameters()}
        return [p for p in self.parameters() if id(p) not in base]

    def adapter_forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def select_features(self, out_index: torch.Tensor | None = None, in_index: torch.Tensor | None = None) -> None:
        """Structural surgery on the base layer (keep or reorder output rows / input columns), with the
        adapter sliced to match so that the function on the kept features is unchanged."""
        if self.merged:
            raise RuntimeError("unmerge the adapter before structural surgery")
        self.select_adapter_features(out_index, in_index)
        select_linear(self.base_layer, out_index, in_index)

    def select_adapter_features(self, out_index: torch.Tensor | None, in_index: torch.Tensor | None) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot follow structural pruning of its base layer")

    def rank_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The down (``r x in``) and up (``out x r``) weights whose rows/columns are the adapter's ranks."""
        raise NotImplementedError(f"{type(self).__name__} has no rank structure")

    def keep_ranks(self, index: torch.Tensor) -> None:
        """Keep only the ranks (bottleneck units) ``index``; the scaling is left as it was."""
        raise NotImplementedError(f"{type(self).__name__} has no rank structure")

    def delta_weight(self) -> torch.Tensor:
        """The adapter as an additive change of the base weight (``out x in``); only when mergeable."""
        raise NotImplementedError(f"{type(self).__name__} cannot be merged into its base layer")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        return self.adapter_forward(x, out)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight; the forward pass then skips the adapter."""
        if not self.mergeable:
            raise NotImplementedError(f"{type(self).__name__} is not linear in its input and cannot be merged")
        if self.merged:
            return
        w = self.base_layer.weight
        w.copy_((w.double() + self.delta_weight().double()).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`, restoring the base weight."""
        if not self.merged:
            return
        w = self.base_layer.weight
        w.copy_((w.double() - self.delta_weight().double()).to(w.dtype))
        self.merged = False
