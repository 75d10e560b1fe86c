"""Adapter layers that wrap and keep a base ``nn.Linear``, their injection by module-name pattern,
merge/unmerge, and parameter accounting."""

from lightmods.peft.accounting import count_parameters
from lightmods.peft.bottleneck import BottleneckAdapter
from lightmods.peft.inject import (
    adapter_layers,
    inject_adapters,
    mark_trainable,
    match_module,
    merge_adapters,
    unmerge_adapters,
)
from lightmods.peft.layer import AdapterLayer
from lightmods.peft.lora import LoraLinear
from lightmods.peft.loretta import LorettaAdapter, LorettaRepLinear
from lightmods.peft.moslora import MoSLoraLinear
from lightmods.peft.tensor_train import TTLinear, tt_shape

__all__ = [
    "AdapterLayer",
    "BottleneckAdapter",
    "LoraLinear",
    "LorettaAdapter",
    "LorettaRepLinear",
    "MoSLoraLinear",
    "TTLinear",
    "adapter_layers",
    "count_parameters",
    "inject_adapters",
    "mark_trainable",
    "match_module",
    "merge_adapters",
    "tt_shape",
    "unmerge_adapters",
]
