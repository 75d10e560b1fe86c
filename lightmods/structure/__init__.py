"""The one structural core every pruning method composes: architecture specs, pruning plans that slice a
model physically, trainable gates, and surgery in the middle of training."""

from lightmods.structure.gates import StructureGates, add_gates, get_gates, remove_gates
from lightmods.structure.hidden import hidden_width, select_hidden
from lightmods.structure.plan import PruningPlan, apply_plan, select_neurons, select_units
from lightmods.structure.spec import Block, BlockLayout, blocks, layout_of
from lightmods.structure.surgery import carry_optimizer_state, refresh_training_state

__all__ = [
    "Block",
    "BlockLayout",
    "PruningPlan",
    "StructureGates",
    "add_gates",
    "apply_plan",
    "blocks",
    "carry_optimizer_state",
    "get_gates",
    "hidden_width",
    "layout_of",
    "refresh_training_state",
    "remove_gates",
    "select_hidden",
    "select_neurons",
    "select_units",
]
