"""Shared fixtures: compose the real config tree with overrides, pointed at a temporary run directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

from lightmods.config import register_schemas  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SHARED = ROOT.parent / "shared"

register_schemas()

# A tiny, quick run: 2-layer random BERT, a few batches of the demo task, no progress bar.
FAST = [
    "model=tiny",
    "data.max_train_samples=64",
    "data.max_eval_samples=32",
    "data.batch_size=16",
    "trainer.max_epochs=1",
    "trainer.log_every_n_steps=1",
    "callbacks.progress_bar=false",
]


def compose_run(overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    """The config ``python train.py <overrides>`` would run, with Hydra's runtime set for interpolations."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
        if output_dir is not None:
            cfg.paths.output_dir = str(output_dir)
    return cfg


@pytest.fixture
def run_cfg(tmp_path):
    """``run_cfg(*overrides)`` -> a composed fast config writing into a fresh tmp dir."""
    counter = iter(range(1000))

    def make(*overrides: str, fast: bool = True) -> DictConfig:
        out = tmp_path / f"run{next(counter)}"
        return compose_run([*(FAST if fast else []), *overrides], out)

    return make


def run_cli(*args: str, cwd: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python train.py <args>`` in a subprocess, as a user would run it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def crash_at_epoch(monkeypatch, cfg, epoch: int) -> Path:
    """Train ``cfg`` until a simulated crash at the start of ``epoch``; returns the run's ``last.ckpt``."""
    from lightmods.modules.task_module import TaskModule
    from lightmods.run import train

    def crash(self):
        if self.current_epoch == epoch:
            raise RuntimeError("simulated crash")

    with monkeypatch.context() as m:
        m.setattr(TaskModule, "on_train_epoch_start", crash, raising=False)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(cfg)
    return Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"


def assert_same_outputs_and_exits(reloaded, trained, ids, threshold: float) -> None:
    """Bit-identical logits at full depth, and the same exit layers and logits under entropy early exit."""
    import torch

    from lightmods.exits import early_exit_forward

    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained(input_ids=ids).logits, rtol=0, atol=0)
    a = early_exit_forward(reloaded, {"input_ids": ids}, threshold)
    b = early_exit_forward(trained, {"input_ids": ids}, threshold)
    assert a.exit_layer.tolist() == b.exit_layer.tolist()
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)


def assert_same_run(a: Path, b: Path, plan: bool = True) -> None:
    """Runs ``a`` and ``b`` (an uninterrupted one and a resumed one) ended the same: bit-identical weights
    in ``last.ckpt``, the same metrics and, with ``plan``, the same exported pruning plan."""
    import json

    import torch

    if plan:
        assert json.loads((a / "export" / "pruning_plan.json").read_text()) == json.loads((b / "export" / "pruning_plan.json").read_text())
    wa = torch.load(a / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    wb = torch.load(b / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert set(wa) == set(wb)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=0, msg=k)
    assert json.loads((a / "metrics.json").read_text()) == json.loads((b / "metrics.json").read_text())
