"""The one path through the code: config -> task, data, backbone, method -> fit -> evaluate -> run files."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from lightmods.attacks.suite import BackdoorSuite
from lightmods.callbacks.meters import ThroughputMeter, peak_memory_mb
from lightmods.config.schema import CallbacksConfig, LoggerConfig, RunConfig, TrainerConfig
from lightmods.config.store import validate
from lightmods.data.datamodule import TextClassificationDataModule
from lightmods.data.images import ImageClassificationDataModule, resolve_task
from lightmods.data.metrics import with_score
from lightmods.data.submission import write_submission
from lightmods.data.tasks import get_task
from lightmods.evaluate import evaluate, predict
from lightmods.exits.flops import mean_sample_flops
from lightmods.exits.training import attach_from_config as attach_exits_from_config
from lightmods.exits.training import exit_parts
from lightmods.export import export_model
from lightmods.methods import build_method
from lightmods.models import build_backbone, build_tokenizer, family_of, model_max_positions
from lightmods.modules import TaskModule
from lightmods.utils.run_files import RunFiles

log = logging.getLogger("lightmods")


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt`` rewritten at every save point. Lightning 2.6's ``save_last`` only refreshes it when a
    top-k checkpoint was saved, which leaves a stale file to resume from when the score stops improving."""

    def __init__(self, dirpath: Path, every_n_train_steps: int | None = None):
        super().__init__(
            dirpath=dirpath, filename="last", monitor=None, save_top_k=1, save_last=False,
            every_n_train_steps=every_n_train_steps, enable_version_counter=False,
        )  # fmt: skip

    @property
    def state_key(self) -> str:
        return "LastCheckpoint"


def build_callbacks(cfg: CallbacksConfig, files: RunFiles) -> list[L.Callback]:
    callbacks: list[L.Callback] = []
    if cfg.checkpoint is not None:
        c = cfg.checkpoint
        if c.save_top_k != 0:
            callbacks.append(
                ModelCheckpoint(
                    dirpath=files.checkpoints,
                    filename="epoch{epoch:02d}-step{step:06d}",
                    auto_insert_metric_name=False,
                    monitor=c.monitor,
                    mode=c.mode,
                    save_top_k=c.save_top_k,
                    every_n_train_steps=c.every_n_train_steps,
                )
            )
        if c.save_last:
            callbacks.append(LastCheckpoint(files.checkpoints, c.every_n_train_steps))
    if cfg.early_stopping is not None:
        e = cfg.early_stopping
        callbacks.append(EarlyStopping(monitor=e.monitor, mode=e.mode, patience=e.patience, min_delta=e.min_delta))
    if cfg.progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=cfg.progress_bar_refresh_rate))
    if cfg.lr_monitor:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    return callbacks


def build_loggers(cfg: LoggerConfig, files: RunFiles, plain_config: dict) -> list[Logger]:
    loggers: list[Logger] = []
    if cfg.csv is not None:
        loggers.append(
            CSVLogger(save_dir=str(files.dir), name=cfg.csv.name, version="", flush_logs_every_n_steps=cfg.csv.flush_logs_every_n_steps)
        )
    if cfg.wandb is not None:
        w = cfg.wandb
        loggers.append(
            WandbLogger(
                project=w.project, entity=w.entity, group=w.group, name=w.name or None, job_type=w.job_type,
                tags=list(w.tags), offline=w.offline, id=w.id, log_model=w.log_model, save_dir=str(files.dir),
            )  # fmt: skip
        )
    for lg in loggers:
        lg.log_hyperparams(plain_config)
    return loggers


def trainer_kwargs(cfg: TrainerConfig) -> dict:
    """Trainer arguments from the schema; unset (None) keys keep Lightning's own defaults."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if v is not None}


def _finish_wandb(failed: bool) -> None:
    try:
        import wandb
    except ImportError:  # pragma: no cover
        return
    if wandb.run is not None:
        wandb.finish(exit_code=1 if failed else 0)


def train(cfg: DictConfig) -> dict:
    """Run one job described by a composed config; returns the final validation metrics.

    Raises ConfigError before any training when the config is invalid. A failing run still leaves its
    ``.hydra/config.yaml`` and a ``summary.json`` with ``status: failed``; a W&B run is always finished.
    """
    rc: RunConfig = validate(cfg)
    plain = OmegaConf.to_container(cfg, resolve=True)
    files = RunFiles(rc.paths.output_dir)
    files.dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    failed = True
    rank = 0
    try:
        metrics = _run(rc, plain, files, started)
        rank = int(metrics.pop("_rank", 0))
        failed = False
        return metrics
    except BaseException as e:
        if rank == 0 and _is_rank_zero():
            files.update_summary({"status": "failed", "error": f"{type(e).__name__}: {e}", "wall_s": round(time.perf_counter() - started, 3)})
        raise
    finally:
        _finish_wandb(failed)


def _is_rank_zero() -> bool:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def structure_report(callbacks: list, module: TaskModule) -> dict:
    """Figures of callbacks that changed the model (pruning), with the final accounting as ``*_after``."""
    report: dict = {}
    for cb in callbacks:
        report.update(getattr(cb, "report", None) or {})
    if module.plan is not None:
        final = module.method_summary()
        report["params_final"] = final["params_total"]
        report["params_trainable_final"] = final["params_trainable"]
        report["pruning_plan"] = "export/pruning_plan.json"
    if "train_samples_per_s_before" in report:
        report["train_samples_per_s_after"] = None  # filled by the caller from the meter
    return report


def _run(rc: RunConfig, plain: dict, files: RunFiles, started: float) -> dict:
    if rc.seed is not None:
        L.seed_everything(rc.seed, workers=True)
    task = resolve_task(get_task(rc.data.task), rc.data)  # images/folder: class names from the folders
    tokenizer = build_tokenizer(rc.model) if task.modality == "text" else None
    model = build_backbone(rc.model, task, tokenizer)
    method = build_method(rc.method)
    model = method.prepare(model, family_of(model))
    attach_exits_from_config(model, rc.exits, task, method)  # exits=all, or a method that needs them
    exit_terms, exit_callbacks = exit_parts(rc.exits, task, method)
    accounting = method.summary(model)
    log.info(
        "method=%s: %s of %s parameters trainable (%.3f%%)",
        rc.method.name, f"{accounting['params_trainable']:,}", f"{accounting['params_total']:,}", accounting["params_trainable_pct"],
    )  # fmt: skip
    for role, n in accounting["params_by_role"].items():
        log.info("  %-8s %14s total %14s trainable", role, f"{n['total']:,}", f"{n['trainable']:,}")
    for key, value in accounting.items():
        if key not in ("params_total", "params_trainable", "params_trainable_pct", "params_by_role"):
            log.info("  %s: %s", key, value)

    positions = model_max_positions(model)
    if positions and rc.data.max_length > positions:
        log.warning("data.max_length=%d exceeds what the model embeds; using %d", rc.data.max_length, positions)
        rc.data.max_length = positions
        if rc.data.doc_stride > positions // 4:
            log.warning("data.doc_stride=%d lowered to %d with it", rc.data.doc_stride, positions // 4)
            rc.data.doc_stride = positions // 4
    backdoor = BackdoorSuite(rc.attack, rc.defense, task, seed=rc.seed or 0)
    if task.modality == "image":
        dm = ImageClassificationDataModule(
            task, rc.data, model.config.image_size, model.config.num_channels, seed=rc.seed or 0, model_path=rc.model.name_or_path
        )
    else:
        dm = TextClassificationDataModule(
            task, rc.data, tokenizer, seed=rc.seed or 0, tokenizer_id=rc.model.tokenizer or rc.model.name_or_path, attack=backdoor.poisoner,
            train_flagger=backdoor.train_flagger(tokenizer),
        )
    module = TaskModule(
        model, task, rc.method.lr, rc.optim, method.loss_terms() + backdoor.loss_terms(), run_config=plain,
        eval_splits={**task.eval_splits, **backdoor.eval_splits}, data_cfg=rc.data, method=method,
        extra_metrics=backdoor.metrics, training_rule=backdoor.training_rule(),
    )  # fmt: skip
    module.loss_terms.extend(exit_terms)
    meter = ThroughputMeter()
    callbacks = build_callbacks(rc.callbacks, files) + method.callbacks() + exit_callbacks + [meter]
    loggers = build_loggers(rc.logger, files, plain)
    trainer = L.Trainer(
        **trainer_kwargs(rc.trainer),
        callbacks=callbacks,
        logger=loggers or False,
        default_root_dir=str(files.dir),
        # no checkpoint callback asked for (save_top_k=0, save_last=false): no Lightning default one either
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=rc.callbacks.progress_bar,
    )
    stage_metrics: dict[str, float] = {}
    if rc.train:
        trainer.fit(module, datamodule=dm, ckpt_path=rc.ckpt_path, weights_only=True)
        if backdoor.two_stage:  # the user's clean fine-tuning after the attacker's injection
            stage_metrics = backdoor.clean_tune(module, dm, rc, files)
    elif rc.ckpt_path:
        state = torch.load(rc.ckpt_path, map_location="cpu", weights_only=True)
        module.on_load_checkpoint(state)
        module.load_state_dict(state["state_dict"])

    fit_metrics = {k: round(float(v), 6) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    log.info("rank %d validation metrics at the end of fit: %s", trainer.global_rank, fit_metrics)
    if trainer.global_rank != 0:
        return {"_rank": trainer.global_rank}

    dm.setup("validate")
    metrics: dict[str, float] = {}
    for split, suffix in module.eval_splits.items():  # the task's splits, then the poisoned one under an attack
        values, predictions = evaluate(module, dm, split, suffix=suffix, extra=backdoor.metrics, task_metrics=split in task.eval_splits)
        metrics.update(values)
        if task.head == "qa":
            files.write_json(f"predictions/{split}.json", predictions)  # the official {id: answer} file
        elif predictions:
            files.write_predictions(split, predictions)
    for split in dm.test_splits:  # a diagnostic set with labels (AX-b, AX-g) is scored as test/<metric>
        if task.head == "causal_lm":  # a language model's test text is scored like its validation text
            values, _ = evaluate(module, dm, split, prefix="test/")
            metrics.update(with_score(values, task, prefix="test/"))
        elif task.base and dm.labelled(split):
            values, predictions = evaluate(module, dm, split, prefix="test/")
            metrics.update(with_score(values, task, prefix="test/"))
            files.write_predictions(split, predictions)
    metrics = {k: round(v, 6) for k, v in {**with_score(metrics, task), **stage_metrics}.items()}
    backdoor.after_evaluation(metrics)
    for cb in callbacks:  # callbacks with final figures of their own (the early-exit sweep): metrics + report
        if hasattr(cb, "final_evaluation"):
            metrics.update(cb.final_evaluation(module, dm, files))
    files.write_json("metrics.json", metrics)
    for split in dm.test_splits if task.head != "causal_lm" else ():
        if task.builder == "record":  # the best candidate entity per query
            _, rows = evaluate(module, dm, split, prefix="test/")
            ordered = [r["prediction"] for r in rows]
        else:
            positions, preds = predict(module, dm.eval_dataloader(split), task)
            ordered = [p for _, p in sorted(zip(positions, preds))]
        path = write_submission(task, split, dm.raw[split], ordered, files.dir / "predictions")
        log.info("%s predictions for submission: %s", split, path)
    export_dir = export_model(
        module.model, files.dir / "export", plain, method.family.head_modules if method.family else (), rc.method.name, plan=module.plan
    )
    log.info("exported the model to %s", export_dir)
    best = next((c for c in callbacks if isinstance(c, ModelCheckpoint) and not isinstance(c, LastCheckpoint)), None)
    last = next((c for c in callbacks if isinstance(c, LastCheckpoint)), None)
    flops = mean_sample_flops(module.model, dm.eval_dataloader(next(iter(task.eval_splits))))  # final model, full depth
    summary = {
        "status": "completed",
        "method": rc.method.name,
        "model": rc.model.name_or_path or f"random:{rc.model.arch.get('model_type')}",
        "task": task.name,
        "val_score": metrics.get("val/score"),  # the headline quality, next to the size figures
        **accounting,
        **structure_report(callbacks, module),
        **backdoor.summary(),
        "train_samples_per_s": round(meter.samples_per_s, 3) if meter.samples_per_s else None,
        "peak_memory_mb": round(peak_memory_mb(module.device), 1),
        "flops_per_sample": round(flops) if flops else None,
        "wall_s": round(time.perf_counter() - started, 3),
        "global_step": trainer.global_step,
        "epochs_completed": trainer.current_epoch,
        "resumed_from": rc.ckpt_path,
        "best_checkpoint": (best.best_model_path or None) if best else None,
        "last_checkpoint": (last.best_model_path or None) if last else None,
    }
    if "train_samples_per_s_after" in summary:
        summary["train_samples_per_s_after"] = summary["train_samples_per_s"]
    files.update_summary(summary)
    numeric = {f"summary/{k}": v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for lg in loggers:
        lg.log_metrics({**metrics, **numeric}, step=trainer.global_step)
        if isinstance(lg, WandbLogger):  # what a metrics row cannot hold: names, status, per-layer lists
            lg.experiment.summary.update({f"summary/{k}": v for k, v in summary.items() if f"summary/{k}" not in numeric and v is not None})
        lg.save()

    width = max(len(k) for k in metrics)
    print("\nValidation metrics:")
    for k, v in metrics.items():
        print(f"  {k:<{width}}  {v:.4f}")
    print(f"Run directory: {Path(files.dir).resolve()}")
    return metrics
