"""LoRA on the linear layers chosen by name pattern (the model family's default: query and value)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from lightmods.config import checks
from lightmods.methods.base import Method, MethodConfig, register_method
from lightmods.models.families import Family
from lightmods.peft import LoraLinear, inject_adapters, mark_trainable


@dataclass
class LoraConfig(MethodConfig):
    name: str = "lora"
    lr: float = 5e-4
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | None = None
    exclude_modules: list[str] = field(default_factory=list)

    def __post_init__(self):
        super().__post_init__()
        checks.positive("method.rank", self.rank)
        checks.positive("method.alpha", self.alpha)
        checks.ratio("method.dropout", self.dropout)


@register_method
class LoRA(Method):
    name = "lora"
    Config = LoraConfig

    def prepare(self, model: nn.Module, family: Family) -> nn.Module:
        c = self.config
        self.family = family
        targets = list(c.target_modules) if c.target_modules else list(family.lora_targets)
        self.injected = inject_adapters(
            model,
            targets,
            lambda linear: LoraLinear(linear, rank=c.rank, alpha=c.alpha, dropout=c.dropout),
            exclude=[*c.exclude_modules, *family.head_modules],
        )
        mark_trainable(model, head_patterns=self.head_patterns())
        return model

    def summary(self, model: nn.Module) -> dict:
        return {**super().summary(model), "lora_modules": len(self.injected)}
