"""Multi-exit heads, entropy early exit (per sample, in batches), FLOPs accounting and the exits' training
and evaluation parts, usable by any method on encoder classifiers (``exits=all``; ``method=cost_eff``)."""

from lightmods.exits.flops import FlopsProfile
from lightmods.exits.heads import (
    EXITS_ATTR,
    ExitHead,
    GradRescale,
    MultiExitHeads,
    attach_exits,
    entropy,
    get_exits,
    grad_rescale,
)
from lightmods.exits.runner import ExitResult, early_exit_forward, final_logits

__all__ = [
    "EXITS_ATTR",
    "ExitHead",
    "ExitResult",
    "FlopsProfile",
    "GradRescale",
    "MultiExitHeads",
    "attach_exits",
    "early_exit_forward",
    "entropy",
    "final_logits",
    "get_exits",
    "grad_rescale",
]
