"""Full fine-tuning: every parameter trains. The baseline every efficient method is compared to."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lightmods.methods.base import Method, MethodConfig, register_method
from lightmods.models.families import Family


@dataclass
class FullFTConfig(MethodConfig):
    name: str = "full_ft"
    lr: float = 2e-5


@register_method
class FullFT(Method):
    name = "full_ft"
    Config = FullFTConfig

    def prepare(self, model: nn.Module, family: Family) -> nn.Module:
        self.family = family
        model.requires_grad_(True)
        return model
