"""Structural surgery in the middle of a Lightning fit: re-wrap DDP, rebuild the optimizer and scheduler,
and carry the optimizer state of every surviving parameter (sliced the same way as the parameter)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def _carry_tensor(value: torch.Tensor, root: nn.Parameter, steps) -> torch.Tensor:
    if not torch.is_tensor(value) or value.shape != root.shape:
        return value  # scalars such as Adam's step count
    for dim, index in steps:
        value = value.index_select(dim, index.to(value.device))
    return value.clone()


def carry_optimizer_state(old: torch.optim.Optimizer, new: torch.optim.Optimizer) -> int:
    """Give each parameter of ``new`` the state its origin had in ``old``; returns how many got state."""
    carried = 0
    for group in new.param_groups:
        for p in group["params"]:
            root, steps = getattr(p, "_lm_origin", (p, ()))
            state = old.state.get(root)
            if state:
                new.state[p] = {k: _carry_tensor(v, root, steps) for k, v in state.items()}
                carried += 1
    return carried


def forget_origins(model: nn.Module) -> None:
    for p in model.parameters():
        if hasattr(p, "_lm_origin"):
            del p._lm_origin


def _continue_schedule(old, new) -> None:
    """Put ``new`` at ``old``'s position; param groups may differ in number (a group can empty out)."""
    new.last_epoch = old.last_epoch
    new._step_count = getattr(old, "_step_count", new._step_count)
    lambdas = getattr(new, "lr_lambdas", None)
    if lambdas is None:
        return
    lrs = [base * fn(new.last_epoch) for base, fn in zip(new.base_lrs, lambdas)]
    for group, lr in zip(new.optimizer.param_groups, lrs):
        group["lr"] = lr
    new._last_lr = lrs


def refresh_training_state(trainer) -> None:
    """After the LightningModule's parameters changed shape: new DDP wrapper, new optimizers and
    schedulers (from ``configure_optimizers``), optimizer state and schedule position carried over."""
    from lightning.fabric.utilities.optimizer import _optimizers_to_device

    strategy = trainer.strategy
    module = strategy.lightning_module
    old_opts = list(strategy.optimizers)
    old_scheds = [c.scheduler for c in strategy.lr_scheduler_configs]
    if isinstance(strategy.model, DistributedDataParallel):
        strategy.model = strategy._setup_model(module)
    strategy.setup_optimizers(trainer)
    for old, new in zip(old_opts, strategy.optimizers):
        carry_optimizer_state(old, new)
    for old, cfg in zip(old_scheds, strategy.lr_scheduler_configs):
        _continue_schedule(old, cfg.scheduler)
    _optimizers_to_device(strategy.optimizers, strategy.root_device)
    forget_origins(module)
