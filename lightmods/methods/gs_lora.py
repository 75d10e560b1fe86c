"""GS-LoRA / GS-LoRA++ (Zhao et al., "Continual Forgetting for Pre-trained Vision Models", CVPR 2024; "Practical
Continual Forgetting for Pre-trained Vision Models", T-PAMI): group-sparse LoRA for continual forgetting.

A sequence of forgetting tasks (``tasks``: the classes each one forgets, by name or index). For task ``t``
every training step takes a batch of retained rows (classes neither forgotten now nor before) and a batch of
rows of the classes to forget, and minimises

    L = CE(retained) + forget_weight * ReLU(bnd - CE(forgotten)) + group_weight * sum_g ||g||  [+ prototype terms]

(``lightmods/losses/group_lasso.py`` for the group lasso; no penalty during the first ``group_warmup`` share of
each task). GS-LoRA++ (``prototype=true``) adds ``proto_forget_weight * ReLU(proto_bnd - KL_f) +
proto_retain_weight * KL_r`` with ``KL = KL(softmax(prototype[y]) || softmax(feature))``, the feature being what
the model's final classification layer reads and ``prototype[c]`` its class mean under the model at the task's
start (push forgotten rows away from their prototype, pull retained ones toward theirs).

Each task gets an equal share of the run's optimizer steps, with the learning-rate schedule (``optim.scheduler``,
``optim.warmup_ratio``) and AdamW state restarted, as the official code builds a new optimizer per task. After
every task but the last, the LoRA is merged into the base weights and re-initialised (A Kaiming-uniform with
``a = sqrt(50)``, B = 0, as the official ``reinitialize_lora_parameters``); the last task's LoRA stays an adapter
for ``export/``. Groups whose entries all fall below ``zero_threshold`` are reported per task and, with
``drop_zero_groups``, dropped (zeroed before the merge; removed from the final adapter). The staged loop is the
:class:`~lightmods.callbacks.forgetting.ContinualForgetting` callback; per-task accuracies on forgotten, retained
and previously forgotten classes before/after and the H-mean go to ``metrics.json``, ``summary.json`` and
``forgetting/task_<t>.json``.

``tasks: []`` trains the run's own task as LoRA with the group penalty alone (the regulariser for any task).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightmods.config import checks
from lightmods.errors import config_error
from lightmods.losses.group_lasso import GROUPINGS, adapter_groups, group_lasso
from lightmods.methods.base import LossTerm, register_method
from lightmods.methods.lora import LoRA, LoraConfig
from lightmods.models.families import Family
from lightmods.peft import AdapterLayer, LoraLinear, adapter_layers

REINIT_A = math.sqrt(50)  # the official re-initialisation of A between tasks (loralib's first init uses sqrt(5))


@dataclass
class GsLoraConfig(LoraConfig):
    name: str = "gs_lora"
    lr: float = 5e-3
    train_head: bool = False  # the official code trains the LoRA alone (backbone and head frozen)
    tasks: list[list[Any]] = field(default_factory=lambda: [[0]])  # classes to forget per task (names or indices)
    bnd: float = 4.0  # ReLU(bnd - CE) on forgotten rows; the official 105-110 is for CosFace logits (s=64)
    forget_weight: float = 0.5  # beta
    group_weight: float = 1.0  # alpha (with AdamW, a group goes to zero when its task gradient norm stays below it)
    grouping: str = "block"
    group_warmup: float = 0.2  # share of each task's steps before the group penalty starts
    zero_threshold: float = 1e-3  # a group is zero when every entry is at most this in absolute value
    drop_zero_groups: bool = True
    forget_shots: int | None = None  # few-shot forgetting: k rows per forgotten class (null: all)
    retain_shots: int | None = None  # k rows per retained class (null: all, or retain_ratio of them)
    retain_ratio: float = 1.0  # share of the retained rows used (the official data_ratio)
    forget_batch_size: int | None = None  # forgotten rows per step (null: data.batch_size)
    prototype: bool = False  # GS-LoRA++
    proto_forget_weight: float = 0.1
    proto_retain_weight: float = 0.0  # 0 in the official scripts
    proto_bnd: float = 2.0

    def __post_init__(self):
        super().__post_init__()
        checks.positive("method.bnd", self.bnd)
        checks.positive("method.proto_bnd", self.proto_bnd)
        for key in ("forget_weight", "group_weight", "zero_threshold", "proto_forget_weight", "proto_retain_weight"):
            checks.non_negative(f"method.{key}", getattr(self, key))
        checks.one_of("method.grouping", self.grouping, GROUPINGS)
        checks.ratio("method.group_warmup", self.group_warmup)
        checks.positive("method.forget_shots", self.forget_shots, allow_none=True)
        checks.positive("method.retain_shots", self.retain_shots, allow_none=True)
        checks.positive("method.forget_batch_size", self.forget_batch_size, allow_none=True)
        if not 0 < self.retain_ratio <= 1:
            raise config_error("method.retain_ratio", self.retain_ratio, "a number in (0, 1]")
        seen: set[str] = set()
        for i, task in enumerate(self.tasks):
            if not task:
                raise config_error(f"method.tasks[{i}]", list(task), "a non-empty list of classes to forget")
            for cls in task:
                if str(cls) in seen:
                    raise config_error(f"method.tasks[{i}]", list(task), f"classes not forgotten before ({cls!r} is already)")
                seen.add(str(cls))

    def check_run(self, run) -> None:
        """Checks against the rest of the run: the classes exist in the task, one class at least stays."""
        from lightmods.data.tasks import TASKS

        task = TASKS[run.data.task]
        if not task.label_names or task.head not in ("seq_cls", "image_cls"):
            raise config_error("method.name", self.name, f"a method for classification tasks; data.task={task.name!r} is not one")
        forgotten = resolve_classes(self.tasks, task.label_names, task.name)
        flat = [c for t in forgotten for c in t]
        if len(set(flat)) < len(flat):
            twice = sorted({task.label_names[c] for c in flat if flat.count(c) > 1})
            raise config_error("method.tasks", [list(t) for t in self.tasks], f"each class forgotten once ({', '.join(twice)} appear twice)")
        if len(set(flat)) >= len(task.label_names):
            raise config_error("method.tasks", [list(t) for t in self.tasks], f"classes to forget that leave at least one of {list(task.label_names)} retained")
        if self.tasks and "ddp" in str(run.trainer.strategy):
            raise config_error("trainer.strategy", run.trainer.strategy, "a single-process strategy with method=gs_lora (its batches pair retained and forgotten rows)")


def resolve_classes(tasks, label_names, task_name: str = "") -> list[list[int]]:
    """Class names or indices (as strings) per task -> class indices; unknown ones are a ConfigError."""
    names = list(label_names)
    out = []
    for i, task in enumerate(tasks):
        ids = []
        for cls in task:
            s = str(cls)
            if s in names:
                ids.append(names.index(s))
            elif s.lstrip("-").isdigit() and 0 <= int(s) < len(names):
                ids.append(int(s))
            else:
                raise config_error(f"method.tasks[{i}]", list(task), f"class names or indices of data.task={task_name!r}: 0..{len(names) - 1} or {', '.join(names)}")
        out.append(ids)
    return out


class TaskSchedule:
    """Optimizer-step boundaries of the forgetting tasks: task ``t`` runs steps ``[bounds[t], bounds[t+1])``,
    an equal share of ``total``. ``accumulate``: batches per optimizer step (maps batches to tasks)."""

    def __init__(self, n_tasks: int, total: int, accumulate: int = 1):
        self.n, self.total, self.accumulate = n_tasks, total, accumulate
        self.bounds = [round(t * total / n_tasks) for t in range(n_tasks + 1)]

    def task_of_step(self, step: int) -> int:
        for t in range(self.n):
            if step < self.bounds[t + 1]:
                return t
        return self.n - 1

    def task_of_batch(self, batch: int) -> int:
        return self.task_of_step(batch // self.accumulate)

    def batch_start(self, t: int) -> int:
        return self.bounds[t] * self.accumulate

    def steps(self, t: int) -> int:
        return self.bounds[t + 1] - self.bounds[t]


def classifier_linear(model: nn.Module, family: Family | None) -> nn.Linear:
    """The final classification layer (``num_labels`` outputs) inside the model's head modules."""
    heads = set(family.head_modules) if family else {"classifier", "score"}
    n = model.config.num_labels
    found = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and not isinstance(m, AdapterLayer) and m.out_features == n and heads & set(name.split(".")):
            found = m
    if found is None:
        raise ValueError(f"no classification layer with {n} outputs in the head modules {sorted(heads)}")
    return found


def pool_features(features: torch.Tensor, batch: dict) -> torch.Tensor:
    """Per-row features: as they are for ``(rows, dim)``; for a per-token head (decoders) the last non-padding
    token, where the head reads its logits."""
    if features.dim() == 2:
        return features
    mask = batch.get("attention_mask")
    if mask is None:
        return features[:, -1]
    last = mask.long().cumsum(-1).argmax(-1)
    return features[torch.arange(features.shape[0], device=features.device), last]


def prototype_kl(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(prototype) || softmax(feature))`` averaged over rows (the features treated as logits)."""
    return F.kl_div(F.log_softmax(features.float(), -1), F.log_softmax(prototypes.float(), -1), log_target=True, reduction="batchmean")


@torch.no_grad()
def merge_and_reinit(model: nn.Module) -> int:
    """Fold every LoRA update into its base weight and re-initialise the LoRA (A Kaiming-uniform with
    ``a = sqrt(50)``, B = 0): the function is unchanged and the next task starts from a fresh adapter."""
    n = 0
    for _, layer in adapter_layers(model):
        if not isinstance(layer, LoraLinear):
            raise TypeError(f"{type(layer).__name__} is not a LoRA layer")
        w = layer.base_layer.weight
        w.copy_((w.double() + layer.delta_weight().double()).to(w.dtype))
        nn.init.kaiming_uniform_(layer.lora_A.weight, a=REINIT_A)
        nn.init.zeros_(layer.lora_B.weight)
        n += 1
    return n


@register_method
class GsLoRA(LoRA):
    name = "gs_lora"
    Config = GsLoraConfig

    def __init__(self, config: GsLoraConfig):
        super().__init__(config)
        self.forget_classes: list[list[int]] = []
        self.schedule: TaskSchedule | None = None
        self.prototypes: torch.Tensor | None = None  # (num_labels, dim), set per task by the callback
        self.optim = None  # the run's OptimConfig (per-task schedule), set by the callback
        self.features: torch.Tensor | None = None  # what the classification layer read in the last forward

    @property
    def continual(self) -> bool:
        return bool(self.forget_classes)

    def prepare(self, model: nn.Module, family: Family) -> nn.Module:
        model = super().prepare(model, family)
        self.label_names = [str(model.config.id2label[i]) for i in range(model.config.num_labels)]
        self.forget_classes = resolve_classes(self.config.tasks, self.label_names)
        self.num_labels = len(self.label_names)
        if self.config.prototype:
            classifier_linear(model, family).register_forward_pre_hook(self._keep_features)
        return model

    def _keep_features(self, module, args) -> None:
        self.features = args[0]

    # ---- schedule -------------------------------------------------------------------------------------
    def schedule_for(self, total: float) -> TaskSchedule:
        if total == float("inf"):
            raise config_error("trainer.max_steps", -1, "a number of steps (or trainer.max_epochs) with method=gs_lora")
        total = int(total)
        if self.schedule is None or self.schedule.total != total:
            accumulate = self.schedule.accumulate if self.schedule is not None else 1
            self.schedule = TaskSchedule(max(1, len(self.forget_classes)), total, accumulate)
        return self.schedule

    def task_at(self, step: int) -> int:
        return self.schedule.task_of_step(step) if self.schedule is not None else 0

    def task_weight(self, step: int) -> float:
        return 0.0 if self.continual else 1.0  # replaced by the retained-rows cross-entropy

    def lr_lambda(self, total: int):
        """Within each task, the run's warm-up and decay (``optim.*``) restart (a fresh optimizer per task)."""
        if not self.continual:
            return None
        from lightmods.modules.task_module import _lr_lambda

        schedule = self.schedule_for(total)
        kind = self.optim.scheduler if self.optim is not None else "linear"
        warm = self.optim.warmup_ratio if self.optim is not None else 0.0
        per_task = [_lr_lambda(kind, int(warm * schedule.steps(t)), max(1, schedule.steps(t))) for t in range(schedule.n)]

        def factor(step: int) -> float:
            t = schedule.task_of_step(step)
            return per_task[t](step - schedule.bounds[t])

        return factor

    # ---- objective ------------------------------------------------------------------------------------
    def forget_mask(self, labels: torch.Tensor, step: int) -> torch.Tensor:
        classes = self.forget_classes[self.task_at(step)] if self.continual else []
        return torch.isin(labels, torch.tensor(classes, dtype=labels.dtype, device=labels.device))

    def _retain(self, module, batch: dict, logits: torch.Tensor) -> torch.Tensor:
        keep = ~self.forget_mask(batch["labels"], module.global_step)
        if not bool(keep.any()):
            return logits.new_zeros((), dtype=torch.float32)
        return F.cross_entropy(logits[keep].float(), batch["labels"][keep])

    def _forget(self, module, batch: dict, logits: torch.Tensor) -> torch.Tensor:
        mask = self.forget_mask(batch["labels"], module.global_step)
        if not bool(mask.any()):
            return logits.new_zeros((), dtype=torch.float32)
        return forgetting_loss(logits[mask], batch["labels"][mask], self.config.bnd)

    def _group_lasso(self, module, batch: dict, logits: torch.Tensor) -> torch.Tensor:
        return group_lasso(adapter_groups(module.model, self.config.grouping)).to(logits.device)

    def _group_schedule(self, step: int) -> float:
        if self.schedule is None or self.config.group_warmup == 0:
            return 1.0
        t = self.schedule.task_of_step(step)
        return 0.0 if step - self.schedule.bounds[t] < self.config.group_warmup * self.schedule.steps(t) else 1.0

    def _proto(self, module, batch: dict, forget: bool) -> torch.Tensor:
        labels = batch["labels"]
        mask = self.forget_mask(labels, module.global_step)
        mask = mask if forget else ~mask
        if self.prototypes is None or self.features is None or not bool(mask.any()):
            return torch.zeros((), device=labels.device)
        feats = pool_features(self.features, batch)[mask]
        kl = prototype_kl(feats, self.prototypes.to(feats.device)[labels[mask]])
        return F.relu(self.config.proto_bnd - kl) if forget else kl

    def loss_terms(self) -> list[LossTerm]:
        c = self.config
        group = LossTerm("group_lasso", c.group_weight, self._group_lasso, schedule=self._group_schedule)
        if not self.config.tasks:
            return [group] if c.group_weight > 0 else []
        terms = [LossTerm("retain", 1.0, self._retain), LossTerm("forget", c.forget_weight, self._forget), group]
        if c.prototype:
            terms.append(LossTerm("proto_forget", c.proto_forget_weight, lambda m, b, z: self._proto(m, b, True)))
            if c.proto_retain_weight > 0:
                terms.append(LossTerm("proto_retain", c.proto_retain_weight, lambda m, b, z: self._proto(m, b, False)))
        return terms

    def callbacks(self) -> list:
        from lightmods.callbacks.forgetting import ContinualForgetting

        return [ContinualForgetting(self)]

    def summary(self, model: nn.Module) -> dict:
        return {**super().summary(model), "lora_groups": len(adapter_groups(model, self.config.grouping)), "grouping": self.config.grouping}


def forgetting_loss(logits: torch.Tensor, labels: torch.Tensor, bnd: float) -> torch.Tensor:
    """``ReLU(bnd - CE)``: the bounded "gradient ascent" on forgotten rows (0 once their mean CE exceeds ``bnd``)."""
    return F.relu(bnd - F.cross_entropy(logits.float(), labels))
