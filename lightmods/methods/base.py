"""What a method is: a config schema plus how it changes the model, what it adds to the loss, and which
callbacks it needs. A method owns no training loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import lightning as L
import torch
from omegaconf import MISSING
from torch import nn

from lightmods.config import checks
from lightmods.models.families import Family
from lightmods.peft import count_parameters

METHODS: dict[str, type[Method]] = {}


@dataclass
class MethodConfig:
    """Keys every method has. ``lr`` is the method's learning rate (PEFT methods want larger ones)."""

    name: str = MISSING
    lr: float = 1e-3
    train_head: bool = True

    def __post_init__(self):
        checks.positive("method.lr", self.lr)


@dataclass
class LossTerm:
    """A named term added to the task loss, ``weight * fn(module, batch, outputs)``; logged on its own."""

    name: str
    weight: float
    fn: Any

    def __call__(self, module: L.LightningModule, batch: dict, logits: torch.Tensor) -> torch.Tensor:
        return self.fn(module, batch, logits)


class Method:
    """Base of every method; subclasses set ``name`` and ``Config`` and override :meth:`prepare`."""

    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]] = MethodConfig

    def __init__(self, config: MethodConfig):
        self.config = config
        self.family: Family | None = None

    def prepare(self, model: nn.Module, family: Family) -> nn.Module:
        """Change the model (inject adapters, masks, exits) and choose what trains. Returns the model."""
        raise NotImplementedError

    def loss_terms(self) -> list[LossTerm]:
        return []

    def callbacks(self) -> list[L.Callback]:
        return []

    def head_patterns(self) -> tuple[str, ...]:
        return self.family.head_modules if (self.family and self.config.train_head) else ()

    def summary(self, model: nn.Module) -> dict:
        """Figures for ``summary.json``: parameter accounting plus whatever the method adds."""
        heads = self.family.head_modules if self.family else ()
        return count_parameters(model, heads)


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: makes ``method=<cls.name>`` available (its schema is stored for Hydra too)."""
    METHODS[cls.name] = cls
    return cls


def build_method(config: MethodConfig) -> Method:
    return METHODS[config.name](config)
