"""LoRA (Hu et al., 2021): a low-rank update ``B A`` scaled by ``alpha / r`` beside a frozen linear layer."""

from __future__ import annotations

import math

import torch
from torch import nn

from lightmods.peft.layer import AdapterLayer, select_linear


class LoraLinear(AdapterLayer):
    """``y = W0 x + (alpha / r) * B A dropout(x)``; ``B`` starts at zero so training starts at the base model.

    Sub-module names (``lora_A``, ``lora_B``) follow HF PEFT so adapters export to its format.
    """

    def __init__(self, base_layer: nn.Linear, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__(base_layer)
        self.rank = rank
        self.scaling = alpha / rank
        w = base_layer.weight
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=w.device, dtype=w.dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def adapter_forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        return base_out + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def select_adapter_features(self, out_index, in_index) -> None:
        select_linear(self.lora_B, out_index=out_index)
        select_linear(self.lora_A, in_index=in_index)

    def rank_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A.weight, self.lora_B.weight

    def keep_ranks(self, index: torch.Tensor) -> None:
        select_linear(self.lora_A, out_index=index)
        select_linear(self.lora_B, in_index=index)
        self.rank = len(index)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}"
