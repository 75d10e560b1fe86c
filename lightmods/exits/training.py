"""Exits for any method: attach them from the ``exits`` config, the joint loss term, the callbacks."""

from __future__ import annotations

import torch
from torch import nn

from lightmods.errors import ConfigError
from lightmods.exits.heads import attach_exits, get_exits


def uses_exits(exits_cfg, method) -> bool:
    """Exits are on with ``exits=all`` or when the method needs them (COST-EFF)."""
    return bool(exits_cfg.enabled or getattr(method, "uses_exits", False))


def attach_from_config(model: nn.Module, exits_cfg, task, method) -> bool:
    """Attach exit heads to a prepared model when the run uses them; True when it does. Called by the run
    and by :func:`lightmods.export.rebuild_model`, so a rebuilt model has the same modules."""
    if not uses_exits(exits_cfg, method):
        return False
    if task.head != "seq_cls" or task.is_regression:
        raise ConfigError(
            f"exits need a classification task; task {task.name!r} is "
            f"{'a regression' if task.is_regression else task.head}. Accepted: exits=none"
        )
    if get_exits(model) is None:
        attach_exits(model, exits_cfg.start, exits_cfg.dropout, exits_cfg.grad_rescale, exits_cfg.pooling)
    return True


def exits_cross_entropy(module, batch: dict, logits: torch.Tensor) -> torch.Tensor:
    """Sum over the intermediate exits of their cross-entropy (the final classifier's is the task loss)."""
    from lightmods.losses.labelled import labelled_cross_entropy  # lightmods.losses imports the methods

    heads = get_exits(module.model)
    terms = [labelled_cross_entropy(z, batch["labels"]) for z in heads.logits.values()]
    return torch.stack(terms).sum() if terms else logits.new_zeros(())


def exit_parts(exits_cfg, task, method) -> tuple[list, list]:
    """(loss terms, callbacks) the run adds for its exits; the method's own objective replaces the generic
    joint cross-entropy when it handles exits itself."""
    from lightmods.exits.evaluation import ExitsEvaluation
    from lightmods.methods.base import LossTerm

    if not uses_exits(exits_cfg, method):
        return [], []
    terms = (
        []
        if getattr(method, "uses_exits", False)
        else [LossTerm("exits", exits_cfg.loss_weight, exits_cross_entropy)]
    )
    return terms, [ExitsEvaluation(exits_cfg)]
