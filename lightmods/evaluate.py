"""Final evaluation on one process: every example scored exactly once, even after a DDP fit."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from lightmods.data.metrics import TaskMetrics
from lightmods.data.tasks import TaskSpec


@torch.no_grad()
def evaluate(module, dataloader: DataLoader, task: TaskSpec, split: str = "validation") -> tuple[dict, list[dict]]:
    """``({"val/<metric>": value, "val/score": ...}, prediction rows)`` for one split."""
    was_training = module.training
    module.eval()
    device = module.device
    metrics = TaskMetrics(task, prefix="val/" if split == "validation" else f"{split}/", sync=False).to(device)
    rows: list[dict] = []
    for batch in dataloader:
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = module(batch)
        metrics.update(logits, batch["labels"])
        preds = metrics.predictions(logits).tolist()
        for idx, pred, label in zip(batch["idx"].tolist(), preds, batch["labels"].tolist()):
            if task.is_regression:
                rows.append({"idx": idx, "prediction": pred, "label": label})
            else:
                rows.append({"idx": idx, "prediction": task.label_names[pred], "label": task.label_names[label]})
    module.train(was_training)
    return metrics.compute(), rows
