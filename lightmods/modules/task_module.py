"""The one LightningModule: a prepared HF model, the task loss plus the method's loss terms, AdamW."""

from __future__ import annotations

import math
import random

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lightmods.config.schema import OptimConfig
from lightmods.data.lm import next_token_nll
from lightmods.data.metrics import eval_task, split_metrics, with_score
from lightmods.data.tasks import TaskSpec
from lightmods.losses.labelled import labelled_cross_entropy
from lightmods.methods.base import LossTerm

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "pixel_values")
NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight", "structure_gates.", "pat_hsm.", "quantizer.alpha")


def _lr_lambda(scheduler: str, warmup: int, total: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return max(0.0, 1.0 - progress) if scheduler == "linear" else 0.5 * (1 + math.cos(math.pi * progress))

    return f


def _numpy_state() -> dict:
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"keys": [int(k) for k in keys], "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)}


def _python_state() -> dict:
    version, state, gauss_next = random.getstate()
    return {"version": version, "state": list(state), "gauss_next": gauss_next}


class TaskModule(L.LightningModule):
    """Trains ``model`` on ``task``. Holds no config objects in hyper-parameters: the resolved run config
    is stored as a plain dict in each checkpoint (``checkpoint["lightmods"]``), so ``weights_only=True``
    loading works."""

    def __init__(
        self,
        model: nn.Module,
        task: TaskSpec,
        lr: float,
        optim: OptimConfig,
        loss_terms: list[LossTerm] = (),
        run_config: dict | None = None,
        eval_splits: dict[str, str] | None = None,
        data_cfg=None,
        method=None,
        extra_metrics=None,
        training_rule=None,
    ):
        """``eval_splits`` beyond the task's own are scored by ``extra_metrics(split, prefix, suffix, sync)``
        alone, which may also add figures to the task's splits (backdoor CACC and ASR). ``training_rule(module,
        batch, logits, loss)`` may replace the loss whose gradient trains (gradient control)."""
        super().__init__()
        self.model = model
        self.method = method
        self.plan = None  # the PruningPlan applied to ``model`` so far, if any
        self.task = task
        self.lr = lr
        self.optim = optim
        self.loss_terms = list(loss_terms)
        self.run_config = run_config or {}
        self.eval_splits = dict(eval_splits or {"validation": ""})
        self.training_rule = training_rule
        own = eval_task(task).eval_splits
        self.val_metrics = nn.ModuleList(
            split_metrics(eval_task(task), split, data_cfg, suffix=s, extra=extra_metrics, task_metrics=split in own)
            for split, s in self.eval_splits.items()
        )

    def forward(self, batch: dict) -> torch.Tensor:
        out = self.model(**{k: batch[k] for k in MODEL_INPUTS if k in batch})
        if self.task.head == "qa":  # (batch, length, 2): start and end scores per token
            return torch.stack([out.start_logits, out.end_logits], dim=-1)
        logits = out.logits
        if self.task.head == "causal_lm":  # (batch, length, vocab)
            return logits
        if self.task.head == "multiple_choice":  # one score per (row, choice) -> (rows, choices)
            logits = logits.view(-1, self.task.num_choices)
        return logits

    def task_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.task.head == "qa":  # labels: (batch, 2) start and end token positions
            start = F.cross_entropy(logits[..., 0].float(), labels[:, 0], ignore_index=-100)
            end = F.cross_entropy(logits[..., 1].float(), labels[:, 1], ignore_index=-100)
            return (start + end) / 2
        if self.task.head == "causal_lm":
            return next_token_nll(logits, labels)
        if self.task.is_regression:
            keep = labels != -100
            return F.mse_loss(logits.squeeze(-1).float()[keep], labels.float()[keep])
        return labelled_cross_entropy(logits, labels)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self(batch)
        loss = self.task_loss(logits, batch["labels"])
        bs = batch["labels"].shape[0]
        self.log("train/loss_task", loss, batch_size=bs)
        if self.method is not None:  # a staged objective may weigh (or drop) the task loss per step
            loss = self.method.task_weight(self.global_step) * loss
        for term in self.loss_terms:
            value = term(self, batch, logits)
            self.log(f"train/loss_{term.name}", value, batch_size=bs)
            loss = loss + term.weight_at(self.global_step) * value
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        if self.training_rule is not None:
            return self.training_rule(self, batch, logits, loss)
        return loss

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        logits = self(batch)
        metrics = self.val_metrics[dataloader_idx]
        if self.task.head != "qa" and self.task.builder != "record":  # scored from answers, not labels
            bs = batch["labels"].shape[0]
            self.log(f"val/loss{metrics.suffix}", self.task_loss(logits, batch["labels"]), sync_dist=True, batch_size=bs, add_dataloader_idx=False)
        metrics.update_batch(logits, batch)

    def on_validation_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        for metrics, split in zip(self.val_metrics, self.eval_splits):
            if hasattr(metrics, "bind") and dm is not None:
                metrics.bind(dm.raw[split], dm.datasets[split].features)

    def on_validation_epoch_end(self) -> None:
        values: dict[str, float] = {}
        for metrics in self.val_metrics:  # torchmetrics syncs its states across DDP ranks
            values.update(metrics.compute())
            metrics.reset()
        self.log_dict(with_score(values, self.task), prog_bar=True, add_dataloader_idx=False)

    def configure_optimizers(self):
        decay, no_decay = [], []
        own_lr: dict[tuple[float, bool], list] = {}  # parameters a method gives a learning rate of their own
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                is_decay = not any(k in name for k in NO_DECAY) and (self.method is None or self.method.decays(name))
                lr = self.method.lr_of(name) if self.method is not None else None
                if lr is not None:
                    own_lr.setdefault((float(lr), is_decay), []).append(p)
                else:
                    (decay if is_decay else no_decay).append(p)
        groups = [
            {"params": decay, "weight_decay": self.optim.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        groups += [
            {"params": ps, "weight_decay": self.optim.weight_decay if d else 0.0, "lr": lr}
            for (lr, d), ps in own_lr.items()
        ]
        opt = torch.optim.AdamW(
            [g for g in groups if g["params"]], lr=self.lr, betas=tuple(self.optim.betas), eps=self.optim.eps
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(self.optim.warmup_ratio * total)
        custom = self.method.lr_lambda(total) if self.method is not None else None  # a method's own stages
        sched = torch.optim.lr_scheduler.LambdaLR(opt, custom or _lr_lambda(self.optim.scheduler, warmup, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def method_summary(self) -> dict:
        return self.method.summary(self.model) if self.method is not None else {}

    def restructure(self, plan) -> None:
        """Apply a pruning plan to the model as it is now (the original model the first time); the plan
        remembered for checkpoints is the composition of every round, in indices of the original model."""
        self.method.restructure(self.model, plan)
        self.plan = plan if self.plan is None else self.plan.then(plan)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # RNG states make a resumed run draw the same dropout masks as an uninterrupted one.
        checkpoint["lightmods"] = {
            "config": self.run_config,
            "plan": self.plan.to_dict() if self.plan is not None else None,
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": _numpy_state(),
                "python": _python_state(),
            },
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # A checkpoint saved after pruning holds the smaller architecture: slice before its weights load.
        plan = checkpoint.get("lightmods", {}).get("plan")
        if plan and self.plan is None:
            from lightmods.structure import PruningPlan
            from lightmods.structure.surgery import forget_origins

            self.restructure(PruningPlan.from_dict(plan))
            forget_origins(self.model)  # these are the parameters the restored optimizer state belongs to
        # Applied at on_train_start, after the sanity check, whose data loader also draws from the RNG.
        self._resume_rng = checkpoint.get("lightmods", {}).get("rng")

    def on_train_start(self) -> None:
        rng, self._resume_rng = getattr(self, "_resume_rng", None), None
        if not rng:
            return
        torch.set_rng_state(rng["torch"])
        n = rng["numpy"]
        np.random.set_state(("MT19937", np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
        p = rng["python"]
        random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
