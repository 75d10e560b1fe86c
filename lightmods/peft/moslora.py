"""MoSLoRA (Wu et al., EMNLP 2024): LoRA with a learnable r x r mixer between A and B, so that the r
rank-1 subspaces are mixed rather than summed; vanilla LoRA is the identity mixer."""

from __future__ import annotations

import math

import torch
from torch import nn

from lightmods.peft.layer import select_linear
from lightmods.peft.lora import LoraLinear

MIXER_INITS = ("kaiming", "orthogonal")


class MoSLoraLinear(LoraLinear):
    """``y = W0 x + (alpha / r) * B M A dropout(x)``; ``M`` starts Kaiming-uniform (the official code) or
    orthogonal, ``B`` at zero, so training starts at the base model. Mergeable: ``delta = s * B M A``."""

    def __init__(self, base_layer: nn.Linear, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0, mixer_init: str = "kaiming"):
        super().__init__(base_layer, rank=rank, alpha=alpha, dropout=dropout)
        w = base_layer.weight
        self.lora_mixer = nn.Linear(rank, rank, bias=False, device=w.device, dtype=w.dtype)
        if mixer_init == "orthogonal":
            nn.init.orthogonal_(self.lora_mixer.weight)
        else:
            nn.init.kaiming_uniform_(self.lora_mixer.weight, a=math.sqrt(5))

    def adapter_forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        return base_out + self.lora_B(self.lora_mixer(self.lora_A(self.lora_dropout(x)))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_mixer.weight @ self.lora_A.weight) * self.scaling

    def keep_ranks(self, index: torch.Tensor) -> None:
        select_linear(self.lora_mixer, out_index=index, in_index=index)
        super().keep_ranks(index)
