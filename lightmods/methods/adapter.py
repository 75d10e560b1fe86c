"""Bottleneck adapters: Houlsby (after attention and FFN outputs) or Pfeiffer (after the FFN output only)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lightmods.config import checks
from lightmods.methods.base import AdapterMethod, AdapterMethodConfig, register_method
from lightmods.models.families import Family
from lightmods.peft import BottleneckAdapter
from lightmods.peft.bottleneck import ACTIVATIONS


@dataclass
class AdapterConfig(AdapterMethodConfig):
    name: str = "adapter"
    lr: float = 1e-3
    variant: str = "houlsby"
    bottleneck_dim: int = 64
    activation: str = "relu"

    def __post_init__(self):
        super().__post_init__()
        checks.one_of("method.variant", self.variant, ("houlsby", "pfeiffer"))
        checks.positive("method.bottleneck_dim", self.bottleneck_dim)
        checks.one_of("method.activation", self.activation, sorted(ACTIVATIONS))


@register_method
class Adapter(AdapterMethod):
    name = "adapter"
    Config = AdapterConfig

    def default_targets(self, family: Family) -> tuple[str, ...]:
        return family.adapter_targets.get(self.config.variant, ())

    def make_layer(self, linear: nn.Linear) -> BottleneckAdapter:
        c = self.config
        return BottleneckAdapter(linear, bottleneck_dim=c.bottleneck_dim, activation=c.activation)
