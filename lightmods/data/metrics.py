"""Task metrics with their official names and definitions; ``score`` is the mean of a task's metrics
over its evaluated splits (the GLUE / SuperGLUE headline)."""

from __future__ import annotations

import torch
import torchmetrics
from torch import nn

from lightmods.data.tasks import TaskSpec

IGNORE = -100


class _GroupedMetric(torchmetrics.Metric):
    """Keeps every (prediction, label, group) so that ``compute`` can score groups of rows."""

    full_state_update = False

    def __init__(self, **kw):
        super().__init__(**kw)
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")
        self.add_state("groups", default=[], dist_reduce_fx="cat")

    def update(self, preds: torch.Tensor, target: torch.Tensor, groups: torch.Tensor) -> None:
        self.preds.append(preds.long())
        self.target.append(target.long())
        self.groups.append(groups.long())

    def _by_group(self) -> dict[int, list[tuple[int, int]]]:
        cat = torchmetrics.utilities.dim_zero_cat
        out: dict[int, list[tuple[int, int]]] = {}
        for g, p, t in zip(cat(self.groups).tolist(), cat(self.preds).tolist(), cat(self.target).tolist()):
            out.setdefault(g, []).append((p, t))
        return out


class GroupExactMatch(_GroupedMetric):
    """MultiRC EM: the share of questions whose every answer option is classified correctly."""

    def compute(self) -> torch.Tensor:
        groups = self._by_group()
        return torch.tensor(sum(all(p == t for p, t in v) for v in groups.values()) / max(len(groups), 1))


class GenderParity(_GroupedMetric):
    """AX-g gender parity: the share of minimal pairs (same ``group``) given the same prediction."""

    def compute(self) -> torch.Tensor:
        groups = self._by_group()
        return torch.tensor(sum(len({p for p, _ in v}) == 1 for v in groups.values()) / max(len(groups), 1))


class BoundMetric(torchmetrics.Metric):
    """A metric scored from a split's rows and features rather than from labels (SQuAD, ReCoRD): call
    :meth:`bind` before ``compute``; ``last_predictions`` holds the decoded answers afterwards."""

    full_state_update = False

    def __init__(self, task: TaskSpec, prefix: str = "val/", suffix: str = "", sync: bool = True):
        super().__init__(sync_on_compute=sync)
        self.task, self.prefix, self.suffix = task, prefix, suffix
        self.rows: list[dict] | None = None
        self.features: dict | None = None
        self.last_predictions: dict = {}

    def bind(self, rows: list[dict], features: dict):
        self.rows, self.features = rows, features
        return self

    def _check_bound(self) -> None:
        if self.rows is None:
            raise RuntimeError(f"{type(self).__name__}.bind(rows, features) was not called")

    def update_batch(self, logits: torch.Tensor, batch: dict) -> None:
        raise NotImplementedError

    def update(self, *args, **kwargs) -> None:  # torchmetrics requires it; update_batch is the entry point
        self.update_batch(*args, **kwargs)


def _make(name: str, task: TaskSpec, **kw) -> torchmetrics.Metric:
    if name == "accuracy":
        return torchmetrics.Accuracy(task="multiclass", num_classes=task.num_labels, average="micro", **kw)
    if name in ("f1", "f1a"):  # F1 of the positive class (MRPC/QQP), over all answer options (MultiRC F1a)
        return torchmetrics.F1Score(task="binary", **kw)
    if name == "macro_f1":
        return torchmetrics.F1Score(task="multiclass", num_classes=task.num_labels, average="macro", **kw)
    if name == "mcc":
        return torchmetrics.MatthewsCorrCoef(task="multiclass", num_classes=task.num_labels, **kw)
    if name == "pearson":
        return torchmetrics.PearsonCorrCoef(**kw)
    if name == "spearman":
        return torchmetrics.SpearmanCorrCoef(**kw)
    if name == "em":
        return GroupExactMatch(**kw)
    if name == "gender_parity":
        return GenderParity(**kw)
    raise KeyError(f"unknown metric {name!r}")


class TaskMetrics(nn.Module):
    """A task's metrics on one split: update with logits and labels, compute to
    ``{prefix + name + suffix: float}``. Rows labelled ``-100`` (unlabelled) are skipped."""

    def __init__(self, task: TaskSpec, prefix: str = "val/", suffix: str = "", sync: bool = True):
        """``sync=False`` for evaluation on one rank of a DDP job: no collective calls the others would miss."""
        super().__init__()
        self.task, self.prefix, self.suffix = task, prefix, suffix
        self.metrics = nn.ModuleDict({name: _make(name, task, sync_on_compute=sync) for name in task.metrics})

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.squeeze(-1).float() if self.task.is_regression else logits.argmax(-1)

    def update_batch(self, logits: torch.Tensor, batch: dict) -> None:
        self.update(logits, batch["labels"], batch.get("group"))

    def update(self, logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor | None = None) -> None:
        keep = labels != IGNORE
        if not bool(keep.any()):
            return
        preds = self.predictions(logits)[keep]
        labels = labels[keep]
        for name, metric in self.metrics.items():
            if name in ("em", "gender_parity"):
                metric.update(preds, labels, groups[keep])
            else:
                metric.update(preds, labels.to(preds.dtype) if self.task.is_regression else labels)

    def compute(self) -> dict[str, float]:
        return {f"{self.prefix}{name}{self.suffix}": float(m.compute()) for name, m in self.metrics.items()}

    def reset(self) -> None:
        for m in self.metrics.values():
            m.reset()


def eval_task(task: TaskSpec) -> TaskSpec:
    """The task whose metrics validation reports: a diagnostic task validates on its base task."""
    from lightmods.data.tasks import get_task

    return get_task(task.base) if task.base else task


def headline_keys(task: TaskSpec, prefix: str = "val/") -> list[str]:
    """The metric names ``<prefix>score`` averages: the task's metrics on each evaluated split."""
    scored = eval_task(task) if prefix == "val/" else task
    return [f"{prefix}{m}{s}" for s in scored.eval_splits.values() for m in scored.metrics]


def with_score(values: dict[str, float], task: TaskSpec, prefix: str = "val/") -> dict[str, float]:
    """Add ``<prefix>score``: the mean of the task's headline metrics (GLUE averages a task's metrics and
    MNLI's matched/mismatched; SQuAD averages EM and F1; breakdowns such as HasAns are not averaged).
    The score is higher-is-better everywhere: lower-is-better metrics (perplexity) enter negated."""
    own = [-values[k] if k.startswith(f"{prefix}perplexity") else values[k] for k in headline_keys(task, prefix) if k in values]
    return {**values, f"{prefix}score": sum(own) / len(own)} if own else dict(values)


def build_metrics(task: TaskSpec, data_cfg=None, prefix: str = "val/", suffix: str = "", sync: bool = True):
    """The metric object of a task: :class:`TaskMetrics`; ReCoRD and SQuAD scoring for answer-based tasks
    (those have ``bind(rows, features)``)."""
    if task.builder == "record":
        from lightmods.data.record_metrics import RecordMetrics

        return RecordMetrics(task, prefix=prefix, suffix=suffix, sync=sync)
    if task.head == "causal_lm":
        from lightmods.data.lm import Perplexity

        return Perplexity(task, prefix=prefix, suffix=suffix, sync=sync)
    if task.head != "qa":
        return TaskMetrics(task, prefix=prefix, suffix=suffix, sync=sync)
    from lightmods.data.qa_metrics import SquadMetrics

    kw = {}
    if data_cfg is not None:
        kw = {"max_length": data_cfg.max_length, "n_best": data_cfg.n_best, "max_answer_length": data_cfg.max_answer_length,
              "null_threshold": data_cfg.null_score_diff_threshold}  # fmt: skip
    return SquadMetrics(task, prefix=prefix, suffix=suffix, sync=sync, **kw)


class MetricGroup(nn.Module):
    """Several metric objects scored on one split (the task's metrics plus, e.g., backdoor CACC): one update,
    their results merged. ``suffix`` names the split's loss (``val/loss<suffix>``)."""

    def __init__(self, parts: list, suffix: str = ""):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.suffix = suffix

    def bind(self, rows: list[dict], features: dict):
        for p in self.parts:
            if hasattr(p, "bind"):
                p.bind(rows, features)
        return self

    def update_batch(self, logits: torch.Tensor, batch: dict) -> None:
        for p in self.parts:
            p.update_batch(logits, batch)

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for p in self.parts:
            out.update(p.compute())
        return out

    def reset(self) -> None:
        for p in self.parts:
            p.reset()

    @property
    def last_predictions(self) -> dict:
        return next((p.last_predictions for p in self.parts if hasattr(p, "last_predictions")), {})


def split_metrics(task: TaskSpec, split: str, data_cfg=None, prefix: str = "val/", suffix: str = "", sync: bool = True,
                  extra=None, task_metrics: bool = True):  # fmt: skip
    """The metric object of one evaluated split: the task's metrics (unless ``task_metrics=False``) plus what
    ``extra(split, prefix, suffix, sync)`` adds for that split (a list of metric objects)."""
    parts = [build_metrics(task, data_cfg, prefix=prefix, suffix=suffix, sync=sync)] if task_metrics else []
    if extra is not None:
        parts += list(extra(split, prefix, suffix, sync))
    if len(parts) == 1 and task_metrics:
        return parts[0]
    return MetricGroup(parts, suffix)
