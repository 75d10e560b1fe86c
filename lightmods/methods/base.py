"""What a method is: a config schema plus how it changes the model, what it adds to the loss, and which
callbacks it needs. A method owns no training loop."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import lightning as L
import torch
from omegaconf import MISSING
from torch import nn

from lightmods.config import checks
from lightmods.errors import config_error
from lightmods.exits.heads import EXITS_ATTR
from lightmods.models.families import Family
from lightmods.peft import AdapterLayer, count_parameters, inject_adapters, mark_trainable

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
    """A named term added to the task loss, ``weight * fn(module, batch, outputs)``; logged on its own.
    ``schedule(step)``, when given, multiplies the weight at each optimizer step."""

    name: str
    weight: float
    fn: Any
    schedule: Any = None

    def __call__(self, module: L.LightningModule, batch: dict, logits: torch.Tensor) -> torch.Tensor:
        return self.fn(module, batch, logits)

    def weight_at(self, step: int) -> float:
        return self.weight * (self.schedule(step) if self.schedule is not None else 1.0)


class Method:
    """Base of every method; subclasses set ``name`` and ``Config`` and override :meth:`prepare`."""

    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    # True for a parameter-free change of the model (e.g. EViT's token reorganisation): the prepared
    # model's weights are the plain model's, so it is exported as a plain transformers model and
    # ``lightmods.export.load_export`` re-applies ``prepare`` from the saved run config.
    export_reapplies: ClassVar[bool] = False

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

    def restructure(self, model: nn.Module, plan) -> nn.Module:
        """Apply a pruning plan to a model this method prepared: gates go (survivors count as 1), the
        structural core slices. Used mid-training, on resume and on export reload alike."""
        from lightmods.structure import apply_plan, remove_gates

        remove_gates(model)
        return apply_plan(model, plan)

    def lr_of(self, param_name: str) -> float | None:
        """A learning rate of its own for the model parameter ``param_name`` (e.g. masks or compactors
        faster than the weights), or None for ``method.lr``. The run's schedule scales both alike."""
        return None

    def decays(self, param_name: str) -> bool:
        """Whether AdamW's weight decay applies to ``param_name`` beyond the run's no-decay names (biases,
        norms, gates); a method opts its structural parameters out (WID's compactors)."""
        return True

    def task_weight(self, step: int) -> float:
        """Weight of the task loss at optimizer step ``step`` (staged objectives change it, e.g. COST-EFF)."""
        return 1.0

    def lr_lambda(self, total: int):
        """A method's own learning-rate factor per step (an ``LambdaLR`` lambda), or None for the run's
        warm-up + linear/cosine schedule."""
        return None

    def head_patterns(self) -> tuple[str, ...]:
        return self.family.head_modules if (self.family and self.config.train_head) else ()

    def summary(self, model: nn.Module) -> dict:
        """Figures for ``summary.json``: parameter accounting plus whatever the method adds."""
        heads = (*(self.family.head_modules if self.family else ()), EXITS_ATTR)  # exit classifiers are heads
        return count_parameters(model, heads)


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: makes ``method=<cls.name>`` available (its schema is stored for Hydra too)."""
    METHODS[cls.name] = cls
    return cls


def build_method(config: MethodConfig) -> Method:
    return METHODS[config.name](config)


@dataclass
class AdapterMethodConfig(MethodConfig):
    """Keys of methods that swap linear layers for adapter layers. ``target_modules: null`` = the model
    family's default placement."""

    target_modules: list[str] | None = None
    exclude_modules: list[str] = field(default_factory=list)


class AdapterMethod(Method):
    """A method that replaces the targeted ``nn.Linear`` layers by one adapter-layer type and trains the
    adapters plus the task head. Subclasses say where by default and which layer."""

    Config: ClassVar[type[AdapterMethodConfig]] = AdapterMethodConfig

    def default_targets(self, family: Family) -> tuple[str, ...]:
        raise NotImplementedError

    def make_layer(self, linear: nn.Linear) -> AdapterLayer:
        raise NotImplementedError

    def prepare(self, model: nn.Module, family: Family) -> nn.Module:
        c = self.config
        self.family = family
        targets = list(c.target_modules) if c.target_modules else list(self.default_targets(family))
        if not targets:
            raise config_error("method.target_modules", c.target_modules, f"module-name patterns (no default placement for the {family.name} family)")
        self.injected = inject_adapters(model, targets, self.make_layer, exclude=[*c.exclude_modules, *family.head_modules])
        mark_trainable(model, head_patterns=self.head_patterns())
        return model

    def summary(self, model: nn.Module) -> dict:
        return {**super().summary(model), "adapted_modules": len(self.injected)}
