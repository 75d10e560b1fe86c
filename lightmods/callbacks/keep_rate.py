"""EViT's keep-rate warm-up as a callback: before every training batch the reorganising layers get the
schedule's keep rate for the current (fractional) epoch; evaluation always uses the target keep rate.

The rate depends only on the optimizer step, so a resumed run continues the schedule where it stopped.
"""

from __future__ import annotations

import math

import lightning as L

from lightmods.tokens import keep_rate_at, set_train_keep_rate


class KeepRateSchedule(L.Callback):
    def __init__(self, target: float, start_epoch: float, epochs: float, kind: str):
        self.target, self.start_epoch, self.epochs, self.kind = target, start_epoch, epochs, kind
        self.rate: float | None = None

    @staticmethod
    def steps_per_epoch(trainer) -> int:
        batches = trainer.num_training_batches
        if not isinstance(batches, int) or batches <= 0:  # inf (iterable loaders) or not known yet
            return 1
        return max(1, math.ceil(batches / max(1, trainer.accumulate_grad_batches)))

    def rate_at_step(self, step: int, steps_per_epoch: int) -> float:
        return keep_rate_at(step / steps_per_epoch, self.target, self.start_epoch, self.epochs, self.kind)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.rate = self.rate_at_step(trainer.global_step, self.steps_per_epoch(trainer))
        set_train_keep_rate(pl_module.model, self.rate)
        pl_module.log("evit/keep_rate", self.rate, on_step=True, on_epoch=False, batch_size=1)

    def on_train_end(self, trainer, pl_module) -> None:
        set_train_keep_rate(pl_module.model, None)
