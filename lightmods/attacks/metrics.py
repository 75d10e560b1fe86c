"""Backdoor figures: clean accuracy (CACC) on the clean dev split and attack success rate (ASR) on the
poisoned dev split. Both are split metrics with the ``update_batch / compute / reset`` interface of
:class:`lightmods.data.metrics.TaskMetrics`, so validation and the final evaluation score them alike."""

from __future__ import annotations

import torch
import torchmetrics
from torch import nn

IGNORE = -100


class AttackSuccessRate(torchmetrics.Metric):
    """The share of rows whose label is not the target that are predicted as the target. Rows of the target
    label (and unlabelled rows) are left out, whatever the split holds."""

    full_state_update = False

    def __init__(self, target: int, **kw):
        super().__init__(**kw)
        self.target = int(target)
        self.add_state("hits", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, labels: torch.Tensor) -> None:
        keep = (labels != self.target) & (labels != IGNORE)
        self.hits += (preds[keep] == self.target).sum()
        self.total += keep.sum()

    def compute(self) -> torch.Tensor:
        return self.hits.float() / self.total.clamp(min=1)


class SplitFigure(nn.Module):
    """One named classification figure over a split, fed with logits and the batch's labels."""

    def __init__(self, name: str, metric: torchmetrics.Metric, prefix: str = "val/", suffix: str = ""):
        super().__init__()
        self.name, self.metric, self.prefix, self.suffix = name, metric, prefix, suffix

    def update_batch(self, logits: torch.Tensor, batch: dict) -> None:
        labels = batch["labels"]
        keep = labels != IGNORE
        if bool(keep.any()):
            self.metric.update(logits.argmax(-1)[keep], labels[keep])

    def compute(self) -> dict[str, float]:
        return {f"{self.prefix}{self.name}": float(self.metric.compute())}

    def reset(self) -> None:
        self.metric.reset()


def clean_accuracy(num_labels: int, prefix: str = "val/", sync: bool = True) -> SplitFigure:
    acc = torchmetrics.Accuracy(
        task="multiclass", num_classes=num_labels, average="micro", sync_on_compute=sync
    )
    return SplitFigure("cacc", acc, prefix)


def attack_success_rate(
    target: int, prefix: str = "val/", suffix: str = "", sync: bool = True
) -> SplitFigure:
    return SplitFigure("asr", AttackSuccessRate(target, sync_on_compute=sync), prefix, suffix)
