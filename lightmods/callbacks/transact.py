"""TransAct's iterative shots as a callback: at the start of each shot (the optimizer steps of
:meth:`TransAct.schedule`), score attention units and FFN neurons by their transitional-activation norms on
calibration rows, keep the top ones per layer at the shot's size, slice physically and go on training.

Resuming: the composed plan travels with the module (a checkpoint saved after shot ``i`` resumes into that
architecture) and the number of shots done with this callback's state; calibration rows come from a generator
seeded by the shot, so a resumed run takes the same decisions as an uninterrupted one.
"""

from __future__ import annotations

import logging

import lightning as L
import torch

from lightmods.callbacks.structural import before_after, calibration_batches, measure, restructure_mid_fit
from lightmods.methods.transact import shot_size
from lightmods.structure import blocks
from lightmods.structure.importance import TransitionalActs
from lightmods.structure.slenderize import slender_plan

log = logging.getLogger("lightmods")


@torch.no_grad()
def transitional_scores(trainer, pl_module, samples: int, seed: int) -> TransitionalActs:
    """Activation norms of the model as it is now, over ``samples`` training rows (eval mode, no gradients,
    the run's precision), non-padding tokens only."""
    model = pl_module.model
    scores = TransitionalActs(model)
    was_training = model.training
    model.eval()
    try:
        with trainer.precision_plugin.forward_context():
            for batch in calibration_batches(trainer, pl_module, samples, seed):
                scores.token_mask = batch.get("attention_mask")
                pl_module(batch)
    finally:
        scores.remove()
        model.train(was_training)
    return scores


class TransActShots(L.Callback):
    def __init__(self, method):
        self.method = method
        self.c = method.config
        self.shots_done = 0
        self.report: dict = {}
        self._before: dict | None = None

    @property
    def state_key(self) -> str:
        return "TransActShots"

    def state_dict(self) -> dict:
        return {"shots_done": self.shots_done, "report": self.report, "before": self._before}

    def load_state_dict(self, state: dict) -> None:
        self.shots_done = int(state["shots_done"])
        self.report = dict(state.get("report", {}))
        self._before = state.get("before")

    # ---- when ---------------------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        self._advance(trainer, pl_module)  # shot 1 prunes at step 0, before any training

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._advance(trainer, pl_module)

    def _advance(self, trainer, pl_module) -> None:
        sched = self.method.schedule(int(trainer.estimated_stepping_batches))
        self.report["shot_start_steps"] = list(sched.starts)
        while self.shots_done < len(sched.starts) and trainer.global_step >= sched.starts[self.shots_done]:
            self.shot(trainer, pl_module, self.shots_done + 1)

    # ---- one shot -----------------------------------------------------------------------------------------
    def shot(self, trainer, pl_module, shot: int) -> None:
        c, model = self.c, pl_module.model
        if self._before is None:  # the original model
            self._before = measure(trainer, pl_module, c.inference_batches)
        model_blocks = blocks(model)
        units = shot_size(max(b.num_units for b in model_blocks), self.method.targets["units"], shot, c.shots)
        neurons = shot_size(max(b.num_neurons for b in model_blocks), self.method.targets["neurons"], shot, c.shots)
        seed = int(getattr(trainer.datamodule, "seed", 0)) * 1009 + shot
        scores = transitional_scores(trainer, pl_module, c.calibration_samples, seed)
        restructure_mid_fit(trainer, pl_module, slender_plan(scores, units, neurons))
        self.shots_done = shot
        model_blocks = blocks(model)
        self.report.setdefault("shot_sizes", []).append({"step": trainer.global_step, "units": units, "neurons": neurons})
        self.report.update(
            {
                "shots_done": shot,
                "calibration_tokens": scores.tokens,
                "heads_kept_per_layer": [b.num_heads for b in model_blocks],
                "neurons_kept_per_layer": [b.num_neurons for b in model_blocks],
                "pruned_at_step": trainer.global_step,
            }
        )
        params = pl_module.method_summary()["params_total"]
        if shot == c.shots:  # the final architecture: training no longer changes what is measured
            self.report.update(before_after(self._before, measure(trainer, pl_module, c.inference_batches)))
        for lg in trainer.loggers:
            lg.log_metrics({"prune/params_total": float(params), "prune/shot": float(shot)}, step=trainer.global_step)
        log.info(
            "TransAct shot %d/%d at step %d: %d attention units (x%d heads) and %d FFN neurons per layer -> %s parameters",
            shot, c.shots, trainer.global_step, units, model_blocks[0].group, neurons, f"{params:,}",
        )  # fmt: skip
