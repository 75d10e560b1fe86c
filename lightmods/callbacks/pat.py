"""PAT's schedule and merge as a callback: the shared mask follows the optimizer step; at the merge step the
HSMs are folded into the adjacent linear layers (mask binarised) and the removed hidden channels are sliced
away by the structural core (``PruningPlan(hidden=kept, rescale_rms=True)``), then training goes on (LoRA on
the compressed model) or ends.

Merge step: ``merge_at=end`` the last optimizer step of the run (the official merge after training),
``schedule`` the mask horizon ``mask_steps``; a run that stops earlier (``max_steps``, early stopping) merges
when training ends. The figures before (the model without its HSMs: the original architecture) and after go
to ``summary.json`` with the shared keys (``lightmods/callbacks/structural.py``); ``params_*`` there are the
parameters as served (backbone + head, LoRA and HSMs merged in).

Resuming: the mask's step is a buffer saved with the model, the merge decision travels as the module's plan
(a checkpoint saved after the merge resumes into the compressed model) and ``done`` with this callback's state.
"""

from __future__ import annotations

import logging

import lightning as L
import torch

from lightmods.callbacks.structural import before_after, measure, restructure_mid_fit
from lightmods.methods.pat import deployed_parameters
from lightmods.structure import PruningPlan
from lightmods.structure.hsm import get_hsms, merge_hsms

log = logging.getLogger("lightmods")


class PatMerge(L.Callback):
    def __init__(self, config):
        self.c = config
        self.done = False
        self.report: dict = {}

    def state_dict(self) -> dict:
        return {"done": self.done, "report": self.report}

    def load_state_dict(self, state: dict) -> None:
        self.done = bool(state["done"])
        self.report = dict(state.get("report", {}))

    def merge_step(self, trainer) -> int:
        if self.c.merge_at == "schedule":
            return int(self.c.mask_steps)
        return int(trainer.estimated_stepping_batches)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        hsm = get_hsms(pl_module.model)
        if hsm is not None:
            hsm.mask.step.fill_(trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        hsm = get_hsms(pl_module.model)
        if hsm is not None:  # how many channels the mask would keep now, and the mean scale it applies
            with torch.no_grad():
                pl_module.log("train/pat_kept", (hsm.mask.mask > 0).sum().float(), batch_size=1)
                pl_module.log("train/pat_scale_mean", hsm.mask.scale().mean(), batch_size=1)
        if not self.done and trainer.global_step >= self.merge_step(trainer):
            self.merge(trainer, pl_module, mid_fit=True)

    def on_train_end(self, trainer, pl_module) -> None:
        if not self.done:
            log.warning(
                "PAT: training ended at step %d before the merge step %d; merging now (mask step %d of horizon %d)",
                trainer.global_step, self.merge_step(trainer), trainer.global_step, self.c.mask_steps,
            )  # fmt: skip
            self.merge(trainer, pl_module, mid_fit=False)

    def _figures(self, trainer, pl_module) -> dict:
        out = measure(trainer, pl_module, self.c.inference_batches)
        out["params"] = deployed_parameters(pl_module.method_summary())
        return out

    def merge(self, trainer, pl_module, mid_fit: bool) -> None:
        model = pl_module.model
        hsm = get_hsms(model)
        if hsm is None:  # resumed into an already merged model
            self.done = True
            return
        width = hsm.mask.mask.numel()
        hsm.detach_hooks()  # "before": the original architecture, as it would serve without the HSMs
        before = self._figures(trainer, pl_module)
        hsm.attach(model)
        kept = merge_hsms(model)
        if not kept:  # a degenerate mask: keep the channel it ranks highest rather than an empty stream
            kept = [int(hsm.mask.mask.detach().argmax())]
            log.warning("PAT: the binarised mask keeps no hidden channel; keeping channel %d", kept[0])
        plan = PruningPlan(hidden=kept, rescale_rms=True)
        if mid_fit:
            restructure_mid_fit(trainer, pl_module, plan)
        else:
            pl_module.restructure(PruningPlan.from_dict(trainer.strategy.broadcast(plan.to_dict(), src=0)))
        self.done = True
        after = self._figures(trainer, pl_module)
        self.report.update(
            {
                "merged_at_step": trainer.global_step,
                "hidden_before": width,
                "hidden_after": len(kept),
                "hidden_target": hsm.mask.target,
                **before_after(before, after),
            }
        )
        figures = {f"pat/{k}": float(v) for k, v in self.report.items() if isinstance(v, (int, float)) and v is not None}
        for lg in trainer.loggers:
            lg.log_metrics(figures, step=trainer.global_step)
        log.info(
            "PAT merged at step %d: hidden %d -> %d (target %d), parameters %s -> %s",
            trainer.global_step, width, len(kept), hsm.mask.target, f"{before['params']:,}", f"{after['params']:,}",
        )  # fmt: skip
