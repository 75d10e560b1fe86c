"""LoRA on the linear layers chosen by name pattern (the model family's default: query and value)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lightmods.config import checks
from lightmods.methods.base import AdapterMethod, AdapterMethodConfig, register_method
from lightmods.models.families import Family
from lightmods.peft import LoraLinear


@dataclass
class LoraConfig(AdapterMethodConfig):
    name: str = "lora"
    lr: float = 5e-4
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        checks.positive("method.rank", self.rank)
        checks.positive("method.alpha", self.alpha)
        checks.ratio("method.dropout", self.dropout)


@register_method
class LoRA(AdapterMethod):
    name = "lora"
    Config = LoraConfig

    def default_targets(self, family: Family) -> tuple[str, ...]:
        return family.lora_targets

    def make_layer(self, linear: nn.Linear) -> LoraLinear:
        c = self.config
        return LoraLinear(linear, rank=c.rank, alpha=c.alpha, dropout=c.dropout)
