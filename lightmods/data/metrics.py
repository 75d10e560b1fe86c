"""Task metrics with their official names; ``score`` is the mean of the task's metrics (GLUE headline)."""

from __future__ import annotations

import torch
import torchmetrics
from torch import nn

from lightmods.data.tasks import TaskSpec


def _make(name: str, task: TaskSpec, **kw) -> torchmetrics.Metric:
    if name == "accuracy":
        return torchmetrics.Accuracy(task="multiclass", num_classes=task.num_labels, average="micro", **kw)
    if name == "f1":  # F1 of the positive class, as GLUE reports for MRPC/QQP
        return torchmetrics.F1Score(task="binary", **kw)
    if name == "macro_f1":
        return torchmetrics.F1Score(task="multiclass", num_classes=task.num_labels, average="macro", **kw)
    if name == "mcc":
        return torchmetrics.MatthewsCorrCoef(task="multiclass", num_classes=task.num_labels, **kw)
    if name == "pearson":
        return torchmetrics.PearsonCorrCoef(**kw)
    if name == "spearman":
        return torchmetrics.SpearmanCorrCoef(**kw)
    raise KeyError(f"unknown metric {name!r}")


class TaskMetrics(nn.Module):
    """The task's metrics as one module: update with logits and labels, compute to ``{prefix+name: float}``."""

    def __init__(self, task: TaskSpec, prefix: str = "val/", sync: bool = True):
        """``sync=False`` for evaluation on one rank of a DDP job: no collective calls the others would miss."""
        super().__init__()
        self.task = task
        self.prefix = prefix
        self.metrics = nn.ModuleDict({name: _make(name, task, sync_on_compute=sync) for name in task.metrics})

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.squeeze(-1).float() if self.task.is_regression else logits.argmax(-1)

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        preds = self.predictions(logits)
        for metric in self.metrics.values():
            metric.update(preds, labels.to(preds.dtype) if self.task.is_regression else labels)

    def compute(self) -> dict[str, float]:
        values = {name: float(m.compute()) for name, m in self.metrics.items()}
        values["score"] = sum(values.values()) / len(values)
        return {self.prefix + k: v for k, v in values.items()}

    def reset(self) -> None:
        for m in self.metrics.values():
            m.reset()
