"""GS-LoRA's continual forgetting as one callback (see ``lightmods/methods/gs_lora.py``).

- ``setup``: the training rows of each task (retained classes, optionally ``retain_ratio`` or ``retain_shots``
  per class; the classes to forget, optionally ``forget_shots`` per class) and the batch sampler that pairs them.
- ``on_train_start``: per-class accuracy of the model before any forgetting; GS-LoRA++ prototypes.
- at each task's last optimizer step: group norms and zero groups, zero groups dropped, per-class accuracy
  after the task, the task's figures (``forgetting/task_<t>.json``, loggers), then (not after the last task)
  LoRA merged and re-initialised, AdamW state cleared, prototypes for the next task.
- ``on_fit_end``: the final task's zero groups removed from the model (so ``export/`` leaves them out).
- ``final_evaluation``: the figures for ``metrics.json``; ``report`` for ``summary.json``.

Accuracies are fractions on the task's first evaluation split; ``acc_f`` is on the classes the task forgets,
``acc_r`` on the classes still retained after it, ``acc_o`` on classes forgotten by earlier tasks;
``h_mean = 2 * drop_f * acc_r_after / (drop_f + acc_r_after)`` with ``drop_f = acc_f_before - acc_f_after``
(the official H).
"""

from __future__ import annotations

import logging
import math
import random

import lightning as L
import torch
from torch.utils.data import DataLoader, Subset

from lightmods.errors import DataError
from lightmods.evaluate import predict
from lightmods.losses.group_lasso import group_report, layers_of_groups, remove_adapters, zero_groups_
from lightmods.methods.gs_lora import merge_and_reinit, pool_features
from lightmods.peft import adapter_layers
from lightmods.utils.run_files import RunFiles

log = logging.getLogger("lightmods")


def class_accuracy(counts: dict, classes) -> float | None:
    """Accuracy over the rows of ``classes`` from per-class ``correct`` / ``total`` counts (None: no rows)."""
    total = sum(counts["total"][c] for c in classes)
    return sum(counts["correct"][c] for c in classes) / total if total else None


def h_mean(acc_f_before: float | None, acc_f_after: float | None, acc_r_after: float | None) -> float | None:
    """The official H: ``2 d r / (d + r)`` with ``d`` the drop in forgotten-class accuracy, ``r`` the retained accuracy."""
    if acc_f_before is None or acc_f_after is None or acc_r_after is None:
        return None
    d = acc_f_before - acc_f_after
    return 2 * d * acc_r_after / (d + acc_r_after) if d + acc_r_after != 0 else 0.0


def select_rows(labels: list[int], classes: list[int], shots: int | None, ratio: float, seed: int, what: str) -> list[int]:
    """Row positions of ``classes``: ``shots`` per class, else a ``ratio`` share per class (all at 1), seeded."""
    rng = random.Random(seed)
    chosen: list[int] = []
    for c in classes:
        rows = [i for i, y in enumerate(labels) if y == c]
        if not rows:
            raise DataError(f"GS-LoRA: no training rows of class {c} ({what})")
        if shots is not None:
            if len(rows) < shots:
                raise DataError(f"GS-LoRA: class {c} has {len(rows)} training rows, fewer than {shots} shots ({what})")
            rows = rng.sample(rows, shots)
        elif ratio < 1:
            rows = rng.sample(rows, max(1, round(ratio * len(rows))))
        chosen += sorted(rows)
    return chosen


class _EpochHolder:
    """Lightning calls ``set_epoch`` on ``batch_sampler.sampler`` at every epoch start."""

    epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class ForgettingBatchSampler:
    """Each batch: up to ``batch_size`` retained rows and ``forget_batch_size`` rows to forget, of the task the
    batch's optimizer step belongs to. Each pool is an endless stream of shuffles (seeded by run seed, task,
    pool and pass), so the smaller pool cycles; the task comes from the batch's position in the run (not from
    callback state), which keeps batches exact although Lightning fetches one batch ahead. An epoch is the
    first task's retained rows once."""

    def __init__(self, pools: list[tuple[list[int], list[int]]], batch_size: int, forget_batch_size: int, seed: int, method):
        self.pools, self.batch_size, self.forget_batch_size = pools, batch_size, forget_batch_size
        self.seed, self.method = seed, method
        self.sampler = _EpochHolder()
        self.length = max(1, math.ceil(len(pools[0][0]) / batch_size))
        self._perms: dict[tuple, tuple[int, list[int]]] = {}  # (task, pool) -> (pass, its shuffle)

    def __len__(self) -> int:
        return self.length

    def _take(self, pool: list[int], start: int, count: int, key: tuple) -> list[int]:
        """Positions ``start .. start + count - 1`` of the pool's stream of shuffles (pass p: seeded by key, p)."""
        out = []
        for pos in range(start, start + count):
            p, i = divmod(pos, len(pool))
            cached = self._perms.get(key)
            if cached is None or cached[0] != p:
                g = torch.Generator().manual_seed(hash_seed(self.seed, *key, p))
                cached = (p, [pool[j] for j in torch.randperm(len(pool), generator=g).tolist()])
                self._perms[key] = cached
            out.append(cached[1][i])
        return out

    def __iter__(self):
        schedule = self.method.schedule
        for pos in range(self.length):
            b = self.sampler.epoch * self.length + pos
            t = schedule.task_of_batch(b) if schedule is not None else 0
            j = b - (schedule.batch_start(t) if schedule is not None else 0)
            retain, forget = self.pools[t]
            nr, nf = min(self.batch_size, len(retain)), min(self.forget_batch_size, len(forget))
            yield self._take(retain, j * nr, nr, (t, 0)) + self._take(forget, j * nf, nf, (t, 1))


def hash_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes."""
    h = 1469598103934665603
    for x in parts:
        h = ((h ^ (int(x) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


class ContinualForgetting(L.Callback):
    def __init__(self, method):
        self.method = method
        self.c = method.config
        self.current = 0  # the task in progress (== number of tasks when all are done)
        self.records: list[dict] = []
        self.original: dict | None = None  # per-class counts of the model before any forgetting
        self.before: dict | None = None  # ... at the current task's start
        self.pools: list[tuple[list[int], list[int]]] = []
        self.dropped: list[str] = []
        self.report: dict = {}

    @property
    def state_key(self) -> str:
        return "ContinualForgetting"

    @property
    def n_tasks(self) -> int:
        return len(self.method.forget_classes)

    def state_dict(self) -> dict:
        protos = self.method.prototypes
        return {"current": self.current, "records": self.records, "original": self.original, "before": self.before,
                "prototypes": protos.detach().cpu() if protos is not None else None}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.current, self.records = int(state["current"]), list(state["records"])
        self.original, self.before = state["original"], state["before"]
        self.method.prototypes = state.get("prototypes")

    # ---- set-up -------------------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        self.method.optim = pl_module.optim
        if stage != "fit" or not self.method.continual:
            return
        dm = trainer.datamodule
        labels = [int(y) for y in dm.datasets["train"].features["labels"]]
        seed = int(getattr(dm, "seed", 0))
        n = self.method.num_labels
        self.pools = []
        for t, forget in enumerate(self.method.forget_classes):
            gone = {c for f in self.method.forget_classes[:t] for c in f}
            retained = [c for c in range(n) if c not in gone and c not in forget]
            retain_rows = select_rows(labels, retained, self.c.retain_shots, self.c.retain_ratio, hash_seed(seed, t, 0), "retained")
            forget_rows = select_rows(labels, forget, self.c.forget_shots, 1.0, hash_seed(seed, t, 1), "to forget")
            self.pools.append((retain_rows, forget_rows))
            log.info("GS-LoRA task %d: forget classes %s (%d rows), retain %s (%d rows)", t, forget, len(forget_rows), retained, len(retain_rows))
        bs = dm.cfg.batch_size
        fbs = self.c.forget_batch_size or bs
        dm.train_batch_sampler = lambda ds: ForgettingBatchSampler(self.pools, bs, fbs, seed, self.method)
        self.method.schedule = None  # rebuilt with this trainer's step count and accumulation

    def on_fit_start(self, trainer, pl_module) -> None:
        schedule = self.method.schedule_for(trainer.estimated_stepping_batches)
        schedule.accumulate = trainer.accumulate_grad_batches
        self.report["forgetting_task_steps"] = [[schedule.bounds[t], schedule.bounds[t + 1]] for t in range(schedule.n)]
        if self.method.continual and min(schedule.steps(t) for t in range(schedule.n)) == 0:
            log.warning("GS-LoRA: %d optimizer steps for %d tasks: some tasks get no step", schedule.total, schedule.n)

    def on_train_start(self, trainer, pl_module) -> None:
        if not self.method.continual:
            return
        if self.original is None:  # a fresh run (a resumed one restores these)
            self.original = self.per_class(trainer, pl_module)
            self.before = self.original
        if self.c.prototype and self.method.prototypes is None and self.current < self.n_tasks:
            self.method.prototypes = self.compute_prototypes(trainer, pl_module, self.current)

    # ---- evaluation -----------------------------------------------------------------------------------
    @torch.no_grad()
    def per_class(self, trainer, pl_module) -> dict:
        """Per-class correct / total on the task's first evaluation split."""
        dm = trainer.datamodule
        split = next(iter(dm.task.eval_splits))
        positions, preds = predict(pl_module, dm.eval_dataloader(split), dm.task)
        n = self.method.num_labels
        correct, total = [0] * n, [0] * n
        for pos, pred in zip(positions, preds):
            y = dm.raw[split][pos]["label"]
            total[y] += 1
            correct[y] += int(pred == y)
        return {"correct": correct, "total": total}

    @torch.no_grad()
    def compute_prototypes(self, trainer, pl_module, t: int) -> torch.Tensor:
        """Mean feature (the classification layer's input) per class over task ``t``'s training rows, with the
        model as it is at the task's start (eval mode)."""
        dm = trainer.datamodule
        retain, forget = self.pools[t]
        loader = DataLoader(Subset(dm.datasets["train"], retain + forget), batch_size=dm.cfg.eval_batch_size, shuffle=False, collate_fn=dm.collator)
        was_training = pl_module.training
        pl_module.eval()
        sums = counts = None
        for batch in loader:
            batch = {k: v.to(pl_module.device) for k, v in batch.items()}
            pl_module(batch)
            feats = pool_features(self.method.features, batch).float()
            if sums is None:
                sums = feats.new_zeros(self.method.num_labels, feats.shape[-1])
                counts = feats.new_zeros(self.method.num_labels)
            sums.index_add_(0, batch["labels"], feats)
            counts.index_add_(0, batch["labels"], torch.ones_like(batch["labels"], dtype=feats.dtype))
        pl_module.train(was_training)
        self.method.features = None
        return sums / counts.clamp_min(1).unsqueeze(-1)

    # ---- task boundaries ------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        schedule = self.method.schedule
        if not self.method.continual or schedule is None:
            return
        while self.current < self.n_tasks and trainer.global_step >= schedule.bounds[self.current + 1]:
            self.end_task(trainer, pl_module, complete=True)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.method.continual and self.current < self.n_tasks:  # stopped early (max_time, fast_dev_run, ...)
            self.end_task(trainer, pl_module, complete=False)

    def end_task(self, trainer, pl_module, complete: bool) -> None:
        t, c, model = self.current, self.c, pl_module.model
        groups = group_report(model, c.grouping, c.zero_threshold)
        if c.drop_zero_groups and groups["zero_groups"]:
            zero_groups_(model, groups["zero_groups"], c.grouping)
        after = self.per_class(trainer, pl_module)
        record = self.task_record(t, self.before, after, groups, trainer, complete)
        self.records.append(record)
        if trainer.is_global_zero:
            RunFiles(trainer.default_root_dir).write_json(f"forgetting/task_{t}.json", record)
        figures = {f"forget/task{t}/{k}": float(v) for k, v in record["metrics"].items() if v is not None}
        for lg in trainer.loggers:
            lg.log_metrics(figures, step=trainer.global_step)
        m = record["metrics"]
        log.info(
            "GS-LoRA task %d done at step %d: forgotten acc %s -> %s, retained %s -> %s, H %s; %d of %d groups zero",
            t, trainer.global_step, _fmt(m["acc_f_before"]), _fmt(m["acc_f_after"]), _fmt(m["acc_r_before"]), _fmt(m["acc_r_after"]),
            _fmt(m["h_mean"]), groups["groups_zero"], groups["groups"],
        )  # fmt: skip
        self.current += 1
        self.before = after
        if self.current < self.n_tasks:  # the next task starts from the merged model with a fresh LoRA
            merge_and_reinit(model)
            for opt in trainer.optimizers:
                opt.state.clear()
            if c.prototype:
                self.method.prototypes = self.compute_prototypes(trainer, pl_module, self.current)

    def task_record(self, t: int, before: dict, after: dict, groups: dict, trainer, complete: bool) -> dict:
        names = self.method.label_names
        forget = self.method.forget_classes[t]
        old = [cls for f in self.method.forget_classes[:t] for cls in f]
        retained = [cls for cls in range(self.method.num_labels) if cls not in forget and cls not in old]
        acc = {
            "acc_f_original": class_accuracy(self.original, forget),
            "acc_f_before": class_accuracy(before, forget),
            "acc_f_after": class_accuracy(after, forget),
            "acc_r_original": class_accuracy(self.original, retained),
            "acc_r_before": class_accuracy(before, retained),
            "acc_r_after": class_accuracy(after, retained),
            "acc_o_before": class_accuracy(before, old) if old else None,
            "acc_o_after": class_accuracy(after, old) if old else None,
        }
        acc["forget_drop"] = acc["acc_f_before"] - acc["acc_f_after"] if acc["acc_f_after"] is not None else None
        acc["retain_drop"] = acc["acc_r_before"] - acc["acc_r_after"] if acc["acc_r_after"] is not None else None
        acc["retain_drop_vs_original"] = acc["acc_r_original"] - acc["acc_r_after"] if acc["acc_r_after"] is not None else None
        acc["h_mean"] = h_mean(acc["acc_f_before"], acc["acc_f_after"], acc["acc_r_after"])
        schedule = self.method.schedule
        retain_rows, forget_rows = self.pools[t]
        return {
            "task": t,
            "complete": complete,
            "forget": [names[i] for i in forget],
            "retained": [names[i] for i in retained],
            "old_forgotten": [names[i] for i in old],
            "train_rows_retain": len(retain_rows),
            "train_rows_forget": len(forget_rows),
            "steps": [schedule.bounds[t], trainer.global_step],
            "metrics": {k: (round(v, 6) if v is not None else None) for k, v in acc.items()},
            "per_class_after": {names[i]: class_accuracy(after, [i]) for i in range(self.method.num_labels)},
            "groups": groups["groups"],
            "groups_zero": groups["groups_zero"],
            "groups_nonzero_frac": groups["groups_nonzero_frac"],
            "zero_groups": groups["zero_groups"],
            "group_norms": groups["group_norms"],
        }

    # ---- the end of the run ---------------------------------------------------------------------------
    def on_fit_end(self, trainer, pl_module) -> None:
        model, c = pl_module.model, self.c
        groups = group_report(model, c.grouping, c.zero_threshold)
        if c.drop_zero_groups and groups["zero_groups"]:
            self.dropped = remove_adapters(model, layers_of_groups(model, groups["zero_groups"], c.grouping))
            log.info("GS-LoRA: %d zero groups dropped (%d adapter layers removed)", groups["groups_zero"], len(self.dropped))
        self.report.update({
            "lora_groups": groups["groups"],
            "lora_groups_zero": groups["groups_zero"],
            "lora_groups_nonzero_frac": groups["groups_nonzero_frac"],
            "zero_groups": groups["zero_groups"],
            "group_norms": groups["group_norms"],
            "dropped_adapters": self.dropped,
            "exported_adapters": sum(1 for _ in adapter_layers(model)),
        })  # fmt: skip
        if self.records:
            self.report["forgetting_tasks"] = [{k: v for k, v in r.items() if k not in ("group_norms",)} for r in self.records]
            self.report["forgetting_tasks_completed"] = sum(r["complete"] for r in self.records)

    def final_evaluation(self, module, dm, files) -> dict:
        """Figures for ``metrics.json``: per task (``val/task<t>/...``) and the sequence's end state."""
        if not self.records:
            return {}
        files.write_json("forgetting/summary.json", {"tasks": self.records, **{k: v for k, v in self.report.items() if k != "forgetting_tasks"}})
        out: dict[str, float] = {}
        for r in self.records:
            for k, v in r["metrics"].items():
                if v is not None:
                    out[f"val/task{r['task']}/{k}"] = v
        last = self.records[-1]
        names = self.method.label_names
        forgotten = [names.index(x) for r in self.records for x in r["forget"]]
        retained = [names.index(x) for x in last["retained"]]
        final = self.before  # per-class counts after the last task (the model evaluated and exported)
        end = {
            "val/acc_forgotten": class_accuracy(final, forgotten),
            "val/acc_forgotten_original": class_accuracy(self.original, forgotten),
            "val/acc_retained": class_accuracy(final, retained),
            "val/acc_retained_original": class_accuracy(self.original, retained),
            "val/h_mean": last["metrics"]["h_mean"],
        }
        out.update({k: round(v, 6) for k, v in end.items() if v is not None})
        return out


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"
