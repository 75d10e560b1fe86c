"""Bottleneck adapters: Houlsby (after attention and FFN outputs) or Pfeiffer (after the FFN output only)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lightmods.config import checks
from lightmods.errors import config_error
from lightmods.methods.base import Method, MethodConfig, register_method
from lightmods.models.families import Family
from lightmods.peft import BottleneckAdapter, inject_adapters, mark_trainable
from lightmods.peft.bottleneck import ACTIVATIONS


@dataclass
class AdapterConfig(MethodConfig):
    name: str = "adapter"
    lr: float = 1e-3
    variant: str = "houlsby"
    bottleneck_dim: int = 64
    activation: str = "relu"
    target_modules: list[str] | None = None

    def __post_init__(self):
        super().__post_init__()
        checks.one_of("method.variant", self.variant, ("houlsby", "pfeiffer"))
        checks.positive("method.bottleneck_dim", self.bottleneck_dim)
        checks.one_of("method.activation", self.activation, sorted(ACTIVATIONS))


@register_method
class Adapter(Method):
    name = "adapter"
    Config = AdapterConfig

    def prepare(self, model: nn.Module, family: Family) -> nn.Module:
        c = self.config
        self.family = family
        targets = list(c.target_modules) if c.target_modules else list(family.adapter_targets.get(c.variant, ()))
        if not targets:
            raise config_error("method.variant", c.variant, f"a variant with known placements for the {family.name} family, or method.target_modules")
        self.injected = inject_adapters(
            model,
            targets,
            lambda linear: BottleneckAdapter(linear, bottleneck_dim=c.bottleneck_dim, activation=c.activation),
            exclude=family.head_modules,
        )
        mark_trainable(model, head_patterns=self.head_patterns())
        return model

    def summary(self, model: nn.Module) -> dict:
        return {**super().summary(model), "adapter_modules": len(self.injected)}
