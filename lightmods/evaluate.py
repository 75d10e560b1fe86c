"""Final evaluation on one process: every example scored exactly once, even after a DDP fit."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from lightmods.data.metrics import TaskMetrics
from lightmods.data.tasks import TaskSpec


@torch.no_grad()
def predict(module, dataloader: DataLoader, task: TaskSpec, metrics: TaskMetrics | None = None) -> tuple[list[int], list]:
    """Row positions and predictions (class index, or float for regression) for every row of a split;
    updates ``metrics`` on labelled rows."""
    was_training = module.training
    module.eval()
    device = module.device
    positions, preds = [], []
    for batch in dataloader:
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = module(batch)
        if metrics is not None:
            metrics.update(logits, batch["labels"], batch.get("group"))
        p = logits.squeeze(-1).float() if task.is_regression else logits.argmax(-1)
        positions += batch["idx"].tolist()
        preds += p.tolist()
    module.train(was_training)
    return positions, preds


def evaluate(module, dataloader: DataLoader, task: TaskSpec, rows: list[dict], prefix: str = "val/", suffix: str = "") -> tuple[dict, list[dict]]:
    """``({"<prefix><metric><suffix>": value}, prediction rows)`` for one labelled split."""
    metrics = TaskMetrics(task, prefix=prefix, suffix=suffix, sync=False).to(module.device)
    positions, preds = predict(module, dataloader, task, metrics)
    out = []
    for pos, pred in zip(positions, preds):
        row = rows[pos]
        if task.is_regression:
            out.append({"idx": row["idx"], "prediction": pred, "label": row["label"]})
        else:
            out.append({"idx": row["idx"], "prediction": task.label_names[pred], "label": task.label_names[row["label"]]})
    return metrics.compute(), out
