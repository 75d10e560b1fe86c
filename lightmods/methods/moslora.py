"""MoSLoRA: LoRA with a learnable subspace mixer (``method=moslora``)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lightmods.config import checks
from lightmods.methods.base import register_method
from lightmods.methods.lora import LoRA, LoraConfig
from lightmods.peft.moslora import MIXER_INITS, MoSLoraLinear


@dataclass
class MoSLoraConfig(LoraConfig):
    name: str = "moslora"
    mixer_init: str = "kaiming"

    def __post_init__(self):
        super().__post_init__()
        checks.one_of("method.mixer_init", self.mixer_init, MIXER_INITS)


@register_method
class MoSLoRA(LoRA):
    name = "moslora"
    Config = MoSLoraConfig

    def make_layer(self, linear: nn.Linear) -> MoSLoraLinear:
        c = self.config
        return MoSLoraLinear(linear, rank=c.rank, alpha=c.alpha, dropout=c.dropout, mixer_init=c.mixer_init)
