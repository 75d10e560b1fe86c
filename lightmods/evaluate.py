"""Final evaluation on one process: every example scored exactly once, even after a DDP fit."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from lightmods.data.metrics import eval_task, split_metrics
from lightmods.data.tasks import TaskSpec


@torch.no_grad()
def predict(module, dataloader: DataLoader, task: TaskSpec, metrics=None) -> tuple[list[int], list]:
    """Feature positions and predictions (class index, or float for regression) for a split; updates
    ``metrics`` on the way (QA metrics gather the logits themselves)."""
    was_training = module.training
    module.eval()
    device = module.device
    positions, preds = [], []
    for batch in dataloader:
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = module(batch)
        if metrics is not None:
            metrics.update_batch(logits, batch)
        if task.head not in ("qa", "causal_lm"):
            p = logits.squeeze(-1).float() if task.is_regression else logits.argmax(-1)
            positions += batch["idx"].tolist()
            preds += p.tolist()
    module.train(was_training)
    return positions, preds


def evaluate(module, dm, split: str, prefix: str = "val/", suffix: str = "", extra=None, task_metrics: bool = True):
    """``({"<prefix><metric><suffix>": value}, predictions)`` for one labelled split: prediction rows for
    classification, the official ``{id: answer}`` mapping for QA. ``extra`` / ``task_metrics``: as in
    :func:`lightmods.data.metrics.split_metrics` (backdoor CACC and ASR)."""
    task, rows = dm.task, dm.raw[split]
    if task.base and not split.startswith("test"):
        task = eval_task(task)
    metrics = split_metrics(task, split, dm.cfg, prefix=prefix, suffix=suffix, sync=False, extra=extra, task_metrics=task_metrics)
    metrics = metrics.to(module.device)
    if hasattr(metrics, "bind"):
        metrics.bind(rows, dm.datasets[split].features)
    positions, preds = predict(module, dm.eval_dataloader(split), task, metrics)
    values = metrics.compute()
    if task.head == "qa":
        return values, metrics.last_predictions
    if task.head == "causal_lm":  # no per-row predictions: the split's perplexity is the result
        return values, []
    if task.builder == "record":
        return values, [{"idx": rows[g]["idx"], "prediction": e, "answers": rows[g]["answers"]} for g, e in sorted(metrics.last_predictions.items())]
    out = []
    for pos, pred in zip(positions, preds):
        row = rows[pos]
        if task.is_regression:
            out.append({"idx": row["idx"], "prediction": pred, "label": row["label"]})
        else:
            out.append({"idx": row["idx"], "prediction": task.label_names[pred], "label": task.label_names[row["label"]]})
    return values, out
