"""Runs through lightmods.run.train: the run-directory contract, resume, reproducibility, loggers, failures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightmods.errors import ConfigError
from lightmods.run import train
from tests.conftest import CONF, crash_at_epoch
from tests.test_tasks import DATA_DIRS


def read(out: Path, name: str) -> dict:
    return json.loads((out / name).read_text())


SUMMARY_KEYS = {"params_total", "params_trainable", "train_samples_per_s", "peak_memory_mb", "wall_s", "status"}


@pytest.mark.parametrize("model", ["tiny", "tiny_llama"])
@pytest.mark.parametrize("method", ["full_ft", "lora", "moslora", "adapter", "loretta_rep", "loretta_adp"])
def test_fast_dev_run_every_method(run_cfg, model, method):
    cfg = run_cfg(f"model={model}", f"method={method}", "trainer.fast_dev_run=2")
    metrics = train(cfg)
    out = Path(cfg.paths.output_dir)
    assert set(read(out, "metrics.json")) == {"val/accuracy", "val/f1", "val/score"} == set(metrics)
    summary = read(out, "summary.json")
    assert SUMMARY_KEYS <= set(summary) and summary["status"] == "completed"
    assert summary["method"] == method and summary["global_step"] == 2
    rows = [json.loads(line) for line in (out / "predictions" / "validation.jsonl").read_text().splitlines()]
    assert len(rows) == 32 and {r["prediction"] for r in rows} <= {"negative", "positive"}


def test_run_directory_contract(run_cfg):
    cfg = run_cfg("trainer.max_epochs=2")
    metrics = train(cfg)
    out = Path(cfg.paths.output_dir)
    s = read(out, "summary.json")
    assert s["global_step"] == 8 and s["epochs_completed"] == 2
    assert s["params_trainable"] < s["params_total"]
    assert s["train_samples_per_s"] > 0 and s["peak_memory_mb"] > 0
    assert (out / "checkpoints" / "last.ckpt").exists() and Path(s["best_checkpoint"]).exists()
    assert metrics["val/score"] == pytest.approx((metrics["val/accuracy"] + metrics["val/f1"]) / 2, abs=1e-6)
    csv = (out / "csv" / "metrics.csv").read_text()
    assert "train/loss" in csv and "val/score" in csv
    # the loggers receive the same final figures as metrics.json
    assert "summary/params_trainable" in csv


def test_checkpoint_loads_with_weights_only(run_cfg):
    cfg = run_cfg()
    train(cfg)
    ckpt = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["lightmods"]["config"]["method"]["name"] == "lora"
    assert "hyper_parameters" not in ckpt  # nothing pickled beyond tensors and plain containers
    assert any("lora_A" in k for k in ckpt["state_dict"])


def test_no_checkpoint_asked_for_writes_none(run_cfg):
    cfg = run_cfg("callbacks.checkpoint.save_top_k=0", "callbacks.checkpoint.save_last=false")
    train(cfg)
    out = Path(cfg.paths.output_dir)
    assert (out / "summary.json").exists()
    assert not list(out.rglob("*.ckpt"))  # not even Lightning's default checkpoint in the logger folder


def test_same_seed_same_metrics(run_cfg):
    a, b = run_cfg("method=adapter", "seed=7"), run_cfg("method=adapter", "seed=7")
    train(a)
    train(b)
    assert read(Path(a.paths.output_dir), "metrics.json") == read(Path(b.paths.output_dir), "metrics.json")
    wa = torch.load(Path(a.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    wb = torch.load(Path(b.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_from_last_ckpt_continues_where_it_stopped(run_cfg, monkeypatch):
    """A 2-epoch run that crashes at the start of epoch 2, resumed from last.ckpt, ends exactly like an
    uninterrupted 2-epoch run: same step count, same weights, same metrics (dropout on, so the RNG
    state restored from the checkpoint matters)."""
    overrides = ("trainer.max_epochs=2", "+model.arch.hidden_dropout_prob=0.3")
    straight = run_cfg(*overrides)
    train(straight)

    last = crash_at_epoch(monkeypatch, run_cfg(*overrides), 1)
    assert torch.load(last, weights_only=True)["global_step"] == 4
    resumed = run_cfg(*overrides, f"ckpt_path={last}")
    train(resumed)
    s = read(Path(resumed.paths.output_dir), "summary.json")
    assert s["global_step"] == 8 and s["resumed_from"] == str(last)
    ws = torch.load(Path(straight.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    wr = torch.load(Path(resumed.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for k in ws:
        torch.testing.assert_close(wr[k], ws[k], msg=k, rtol=0, atol=0)
    assert read(Path(resumed.paths.output_dir), "metrics.json") == read(Path(straight.paths.output_dir), "metrics.json")


def test_evaluate_a_checkpoint_without_training(run_cfg):
    cfg = run_cfg("trainer.max_epochs=2")
    metrics = train(cfg)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    again = train(run_cfg("train=false", f"ckpt_path={last}"))
    assert again == metrics


def test_failed_run_leaves_status_and_config(run_cfg):
    cfg = run_cfg("method.target_modules=[no_such_layer]")
    with pytest.raises(ConfigError, match="no_such_layer"):
        train(cfg)
    s = read(Path(cfg.paths.output_dir), "summary.json")
    assert s["status"] == "failed" and "no_such_layer" in s["error"]


def test_invalid_config_stops_before_writing_anything(run_cfg):
    cfg = run_cfg("method.rank=-3")
    with pytest.raises(ConfigError, match="method.rank=-3"):
        train(cfg)
    assert not Path(cfg.paths.output_dir).exists()


def test_wandb_offline_run_is_finished(run_cfg, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = run_cfg("logger=[csv,wandb]")
    train(cfg)
    assert wandb.run is None  # finished
    out = Path(cfg.paths.output_dir)
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1


def test_wandb_run_finished_with_failure_code(run_cfg, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    calls = []
    real_finish = wandb.finish
    monkeypatch.setattr(wandb, "finish", lambda exit_code=None, **kw: (calls.append(exit_code), real_finish(exit_code=exit_code))[1])
    from lightmods.modules import task_module

    def boom(self, batch, batch_idx):
        raise RuntimeError("boom in training_step")

    monkeypatch.setattr(task_module.TaskModule, "training_step", boom)
    with pytest.raises(RuntimeError, match="boom"):
        train(run_cfg("logger=wandb"))
    assert calls == [1] and wandb.run is None


PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml") if "sweeper:" not in p.read_text())


@pytest.mark.parametrize("experiment", PRESETS)
def test_every_experiment_runs_on_the_tiny_model(run_cfg, experiment):
    """Each preset's run on the tiny model, on CPU, with local files where it reads the hub (paper presets);
    sweep files (``hydra.sweeper.params``) are composed job by job in tests/test_sweeps.py."""
    cfg = run_cfg(f"experiment={experiment}", fast=False)
    local = DATA_DIRS.get(cfg.data.task) if not cfg.data.data_dir else None  # a hub task: its local files
    local = [f"data.data_dir={local}"] if local else []
    cfg = run_cfg(
        f"experiment={experiment}", "model=tiny", "trainer=cpu", "trainer.fast_dev_run=1", "exits.timing=false",
        "data.max_train_samples=64", "data.max_eval_samples=64", *local, fast=False,
    )  # fmt: skip
    assert cfg.model.init == "random"
    train(cfg)
    assert read(Path(cfg.paths.output_dir), "summary.json")["status"] == "completed"
