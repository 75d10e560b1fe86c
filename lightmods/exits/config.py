"""The ``exits`` config group: multi-exit heads and early-exit evaluation for any method."""

from __future__ import annotations

from dataclasses import dataclass, field

from lightmods.config import checks
from lightmods.errors import config_error

# test.sh's sweep for binary tasks (tau = 0: no early exit)
DEFAULT_THRESHOLDS = [0.6, 0.55, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.0]


@dataclass
class ExitsConfig:
    """``exits=all`` adds an exit classifier after every layer from ``start`` (the final classifier is the
    last exit), trains them jointly (``loss_weight`` x the sum of their cross-entropies, with gradient
    equilibrium) and evaluates early exit over ``thresholds``. Methods that need exits (``method=cost_eff``)
    get them whatever ``name`` says; the other keys apply to them too."""

    name: str = "none"  # none | all
    start: int = 1  # first (1-based) layer with an exit
    dropout: float = 0.1
    pooling: str = "cls"  # cls (official default) | mean: over non-padding tokens (official "avg")
    loss_weight: float = 1.0  # weight of the sum of the intermediate exits' cross-entropies
    grad_rescale: bool = True  # gradient equilibrium between exits
    thresholds: list[float] = field(default_factory=lambda: list(DEFAULT_THRESHOLDS))  # entropy sweep
    tolerance: float = 0.01  # selected threshold: least FLOPs within this accuracy of no early exit
    eval_batch_size: int | None = None  # early-exit evaluation batch size (null: data.eval_batch_size)
    timing: bool = True  # measure wall-clock samples/s per threshold

    def __post_init__(self):
        checks.one_of("exits.name", self.name, ("none", "all"))
        checks.positive("exits.start", self.start)
        checks.ratio("exits.dropout", self.dropout)
        checks.one_of("exits.pooling", self.pooling, ("cls", "mean"))
        checks.non_negative("exits.loss_weight", self.loss_weight)
        if not self.thresholds or any(t < 0 for t in self.thresholds):
            raise config_error(
                "exits.thresholds", list(self.thresholds), "a non-empty list of entropies >= 0"
            )
        checks.non_negative("exits.tolerance", self.tolerance)
        checks.positive("exits.eval_batch_size", self.eval_batch_size, allow_none=True)

    @property
    def enabled(self) -> bool:
        return self.name != "none"
