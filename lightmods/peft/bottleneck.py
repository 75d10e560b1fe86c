"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2020) on the output of a projection."""

from __future__ import annotations

import torch
from torch import nn

from lightmods.peft.layer import AdapterLayer, select_linear

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


class BottleneckAdapter(AdapterLayer):
    """``h = W x + b; y = h + up(act(down(h)))``, placed on the attention-output and/or FFN-output projection,
    i.e. before the residual add and LayerNorm as in the papers. ``up`` starts at zero, so the adapter
    starts as the identity. Not mergeable: the activation makes it non-linear.
    """

    mergeable = False

    def __init__(self, base_layer: nn.Linear, bottleneck_dim: int = 64, activation: str = "relu"):
        super().__init__(base_layer)
        w = base_layer.weight
        self.bottleneck_dim = bottleneck_dim
        self.adapter_down = nn.Linear(self.out_features, bottleneck_dim, device=w.device, dtype=w.dtype)
        self.adapter_act = ACTIVATIONS[activation]()
        self.adapter_up = nn.Linear(bottleneck_dim, self.out_features, device=w.device, dtype=w.dtype)
        nn.init.normal_(self.adapter_down.weight, std=1e-2)
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)

    def adapter_forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        return base_out + self.adapter_up(self.adapter_act(self.adapter_down(base_out)))

    def select_adapter_features(self, out_index, in_index) -> None:
        # The adapter reads and writes the base output: input columns of the base layer concern it not; output
        # rows (hidden-channel pruning) go from its down projection's input and its up projection's output.
        if out_index is not None:
            select_linear(self.adapter_down, in_index=out_index)
            select_linear(self.adapter_up, out_index=out_index)

    def rank_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.adapter_down.weight, self.adapter_up.weight

    def keep_ranks(self, index: torch.Tensor) -> None:
        select_linear(self.adapter_down, out_index=index)
        select_linear(self.adapter_up, in_index=index)
        self.bottleneck_dim = len(index)

    def extra_repr(self) -> str:
        return f"bottleneck_dim={self.bottleneck_dim}"
