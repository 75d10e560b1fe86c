"""WID's training schedule and merge as one callback (``method=wid``, see ``lightmods/methods/wid.py``).

- ``setup``: the teacher is loaded (``method.teacher``, checked against the student's architecture) and the
  student inherits its weights (compactors stay identity).
- Schedule: mask round ``k`` (1..R) at optimizer step ``k * w_step``; ``w_step`` null derives it from the run:
  the target is reached by step ``H = min(mask_end * merge_step, S)`` (at least 1), where from step ``S`` the
  learning rate left until the merge (the run's schedule, warm-up and decay included; plain steps for
  decoupled shrinking, which does not follow the learning rate) is worth ``shrink_steps`` full-rate steps; ``R = min(mask_rounds, H)``, ``w_step = floor(H / R)``. So the masked entries of the last
  round can still shrink before the merge zeroes them, whatever ``trainer.max_steps`` is. A run too
  short for that is warned about at the start; the merge reports what the zeroing cut (``masked_residual``:
  root mean square norm of the masked compactor rows/columns, 1 when masked, 0 when fully shrunk) and warns
  above 0.1.
- Each optimizer step (``on_before_optimizer_step``, after backward): masked compactor entries decay by
  ``1 - rho`` outside the optimizer (``shrink: decoupled``, :func:`decay_masked_`; ``rho`` leaves 1% of the
  norm of the last round's channels at the merge) or get the L2 penalty in place of their gradient
  (``shrink: gradient``, :func:`shrink_masked_grads_`); before the first round every compactor gradient gets
  ``+ pre_mask_l2 * w``; before each forward the hidden gate follows the masked channels' compactor norms.
- Merge at ``merge_step`` (default the last optimizer step; a run that stops earlier merges when training
  ends): masked entries set to 0, gate set to the 0/1 mask, compactors merged and the kept channels sliced by
  the structural core (``PruningPlan``, in checkpoints and ``export/``). ``summary.json`` gets the shared
  before/after figures (``callbacks/structural.py``): "before" is the teacher, the uncompressed architecture.

Resuming: masks, rounds and the gate are buffers of the model (in every checkpoint); after the merge the
module's plan rebuilds the dense student and ``done`` travels in this callback's state.
"""

from __future__ import annotations

import logging

import lightning as L
import torch

from lightmods.callbacks.structural import before_after, measure, restructure_mid_fit
from lightmods.errors import config_error
from lightmods.methods.wid import (
    add_l2_grads_,
    decay_masked_,
    decay_rate,
    get_state,
    mask_round,
    masked_residual,
    masked_share,
    shrink_masked_grads_,
)
from lightmods.structure import PruningPlan
from lightmods.structure.compactors import zero_masked_

log = logging.getLogger("lightmods")


def shrink_start(merge_at: int, window: float, factor) -> int:
    """The latest step from which the learning rate left until ``merge_at`` (sum of ``factor(t)``) is worth
    ``window`` full-rate steps (0 if even the whole run is not)."""
    mass = 0.0
    for t in range(merge_at - 1, -1, -1):
        mass += factor(t)
        if mass >= window:
            return t
    return 0


def lr_factor(trainer):
    """The run's learning-rate multiplier per optimizer step (the task module's ``LambdaLR``), constant 1 otherwise."""
    configs = getattr(trainer, "lr_scheduler_configs", None) or []
    lambdas = getattr(configs[0].scheduler, "lr_lambdas", None) if configs else None
    return lambdas[0] if lambdas else (lambda t: 1.0)


class WidTraining(L.Callback):
    def __init__(self, config, method):
        self.c = config
        self.method = method
        self.done = False
        self.report: dict = {}
        self.w_step: int | None = None
        self.rounds: int | None = None
        self.merge_at: int | None = None
        self.rho = 1.0  # decoupled shrinking: per-step decay of masked entries

    def state_dict(self) -> dict:
        return {"done": self.done, "report": self.report}

    def load_state_dict(self, state: dict) -> None:
        self.done = bool(state["done"])
        self.report = dict(state.get("report", {}))

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or self.method.teacher is not None:
            return
        from lightmods.methods.teacher import inherit_weights, load_teacher

        teacher = load_teacher(self.c.teacher, pl_module.model)
        inherit_weights(pl_module.model, teacher, self.c.teacher, own=self.method.owns)
        self.method.teacher = teacher
        log.info("wid: teacher loaded from %s; targets %s", self.c.teacher, self.method.targets)

    def schedule(self, total: int, lr_factor=None) -> tuple[int, int, int]:
        """(w_step, rounds, merge step) for a run of ``total`` optimizer steps whose learning rate at step ``t`` is
        ``lr_factor(t)`` times the configured one (default constant)."""
        c = self.c
        if c.merge_step is not None and c.merge_step > total:
            raise config_error("method.merge_step", c.merge_step, f"null or at most the run's {total} optimizer steps")
        merge_at = c.merge_step or total
        if c.w_step is not None:
            if c.w_step * c.mask_rounds > merge_at:
                raise config_error(
                    "method.w_step", c.w_step,
                    f"null or at most {merge_at // c.mask_rounds} (w_step x mask_rounds={c.mask_rounds} must come by the merge at step {merge_at})",
                )  # fmt: skip
            return c.w_step, c.mask_rounds, merge_at
        horizon = max(1, min(int(c.mask_end * merge_at), shrink_start(merge_at, c.shrink_window, lr_factor or (lambda t: 1.0))))
        rounds = min(c.mask_rounds, horizon)
        return max(1, horizon // rounds), rounds, merge_at

    def on_train_start(self, trainer, pl_module) -> None:
        decoupled = self.c.shrink == "decoupled"
        factor = (lambda t: 1.0) if decoupled else lr_factor(trainer)
        self.w_step, self.rounds, self.merge_at = self.schedule(int(trainer.estimated_stepping_batches), factor)
        last = self.w_step * self.rounds
        self.rho = decay_rate(self.merge_at - last)
        if self.done:
            return
        log.info("wid: %d mask rounds every %d steps (the last at step %d), merge at step %d%s", self.rounds, self.w_step, last, self.merge_at,
                 f"; masked compactor entries decay by {self.rho:.4f} per step" if decoupled else "")  # fmt: skip
        left = sum(factor(t) for t in range(last, self.merge_at))
        if not decoupled and left < self.c.shrink_window:
            log.warning(
                "wid: the learning rate left between the last mask round (step %d) and the merge (step %d) is worth %.0f full-rate "
                "steps, where masked compactor entries need about %d (2 / (l2_lambda x compactor_lr)) to shrink; the merge will cut "
                "what is left (see masked_residual): train longer, or raise method.compactor_lr", last, self.merge_at, left, self.c.shrink_window,
            )  # fmt: skip

    def _catch_up(self, model, upto: int) -> None:
        state = get_state(model)
        while int(state.rounds) < upto:
            k = int(state.rounds) + 1
            mask_round(model, self.method.targets, k, self.rounds)
            log.info("wid: mask round %d/%d: %s", k, self.rounds, masked_share(model))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        state = get_state(pl_module.model)
        if self.done or state is None:
            return
        self._catch_up(pl_module.model, min(self.rounds, trainer.global_step // self.w_step))
        state.fade(pl_module.model)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        state = get_state(pl_module.model)
        if self.done or state is None:
            return
        if int(state.rounds) == 0:
            if self.c.pre_mask_l2 > 0:
                add_l2_grads_(pl_module.model, self.c.pre_mask_l2)
            return
        if self.c.shrink == "decoupled":
            decay_masked_(pl_module.model, state.masks(), self.rho, optimizer)
            return
        shrink_masked_grads_(pl_module.model, state.masks(), self.c.l2_lambda, optimizer if self.c.adam_inject else None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for k, v in masked_share(pl_module.model).items():
            pl_module.log(f"train/wid_{k}", v, batch_size=1)
        if not self.done and trainer.global_step >= self.merge_at:
            self.merge(trainer, pl_module, mid_fit=True)

    def on_train_end(self, trainer, pl_module) -> None:
        if not self.done:
            log.warning("wid: training ended at step %d before the merge step %d; merging now", trainer.global_step, self.merge_at)
            self.merge(trainer, pl_module, mid_fit=False)

    def _figures(self, trainer, pl_module, model=None) -> dict:
        """The shared figures of ``model`` (default: the module's own) measured in the module's place."""
        live = pl_module.model
        if model is not None:
            pl_module.model = model
        try:
            return measure(trainer, pl_module, self.c.inference_batches)
        finally:
            pl_module.model = live
            if model is not None:
                model.eval()

    @torch.no_grad()
    def merge(self, trainer, pl_module, mid_fit: bool) -> None:
        model = pl_module.model
        state = get_state(model)
        if state is None:  # resumed into an already merged model
            self.done = True
            return
        if int(state.rounds) < self.rounds:
            log.warning("wid: merging at step %d after %d of %d mask rounds; masking the rest now", trainer.global_step, int(state.rounds), self.rounds)
            self._catch_up(model, self.rounds)
        masks = state.masks()
        before = self._figures(trainer, pl_module, self.method.teacher)  # the uncompressed architecture
        residual = masked_residual(model, masks)
        if residual > 0.1:
            log.warning("wid: the masked compactor rows/columns still have %.3f of their norm (1 = not shrunk) at the merge, which "
                        "zeroes them; the student may lose quality (more steps after the last round: see method.shrink_steps)", residual)  # fmt: skip
        zero_masked_(model, masks)
        if state.gate is not None:
            state.gate.copy_(masks.hidden.float())
        plan = masks.to_plan(model)
        widths = {"hidden_before": masks.hidden.numel(), "hidden_after": int(masks.hidden.sum()),
                  "ffn_before": masks.neurons[0].numel(), "ffn_after_per_layer": [int(n.sum()) for n in masks.neurons],
                  "units_before": masks.units[0].numel(), "units_after_per_layer": [int(u.sum()) for u in masks.units]}  # fmt: skip
        if mid_fit:
            restructure_mid_fit(trainer, pl_module, plan)
        else:
            pl_module.restructure(PruningPlan.from_dict(trainer.strategy.broadcast(plan.to_dict(), src=0)))
        self.done = True
        after = self._figures(trainer, pl_module)
        self.report.update({"merged_at_step": trainer.global_step, "w_step": self.w_step, "mask_rounds": self.rounds,
                            "masked_residual": round(residual, 6), **widths, **before_after(before, after)})  # fmt: skip
        figures = {f"wid/{k}": float(v) for k, v in self.report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for lg in trainer.loggers:
            lg.log_metrics(figures, step=trainer.global_step)
        log.info(
            "wid merged at step %d: hidden %d -> %d, parameters %s -> %s",
            trainer.global_step, widths["hidden_before"], widths["hidden_after"], f"{before['params']:,}", f"{after['params']:,}",
        )  # fmt: skip
