"""``python train.py`` as a user runs it: help, early config errors, DDP on two CPU processes."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow

TINY = ["experiment=smoke_tiny", "data.max_train_samples=64", "data.max_eval_samples=48", "callbacks.progress_bar=false"]


def test_help_lists_the_groups():
    r = run_cli("--help")
    assert r.returncode == 0
    for group in ("model:", "data:", "method:", "trainer:", "logger:", "callbacks:", "experiment:"):
        assert group in r.stdout
    assert "lora" in r.stdout and "ddp_cpu" in r.stdout and "tiny_llama" in r.stdout


@pytest.mark.parametrize(
    "override,expected",
    [
        ("method.rank=-1", "method.rank=-1 is not accepted; accepted: a number > 0"),
        ("method=nope", "Could not find 'method/nope'"),
        ("method.rnk=4", "method.rnk"),
        ("method.rank=abc", "method.rank"),
    ],
)
def test_bad_config_exits_nonzero_before_training(override, expected, tmp_path):
    run_dir = tmp_path / "run"
    r = run_cli(*TINY, override, f"hydra.run.dir={run_dir}")
    assert r.returncode != 0
    assert expected in r.stderr, r.stderr[-2000:]
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.json").exists()


def test_cli_run_writes_resolved_config_and_prints_results(tmp_path):
    run_dir = tmp_path / "run"
    r = run_cli(*TINY, f"hydra.run.dir={run_dir}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Validation metrics:" in r.stdout and f"Run directory: {run_dir}" in r.stdout
    assert (run_dir / ".hydra" / "config.yaml").exists()
    assert json.loads((run_dir / "metrics.json").read_text())["val/score"] >= 0


def test_ddp_cpu_runs_two_processes_that_see_the_same_metrics(tmp_path):
    run_dir = tmp_path / "ddp"
    # 47 validation rows: an odd count, so a padded sampler would score a row twice
    r = run_cli(*TINY, "trainer=ddp_cpu", "trainer.max_epochs=1", "data.max_eval_samples=47", f"hydra.run.dir={run_dir}")
    assert r.returncode == 0, r.stderr[-3000:]
    logs = "".join(p.read_text() for p in run_dir.glob("*.log"))
    per_rank = dict(re.findall(r"rank (\d) validation metrics at the end of fit: (\{.*\})", logs))
    assert set(per_rank) == {"0", "1"}, logs[-2000:]
    assert per_rank["0"] == per_rank["1"]
    assert len(list(run_dir.rglob("config.yaml"))) == 1  # one run dir, one resolved config
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    # 64 training rows over 2 ranks x batch 32: one step per epoch on each rank
    assert summary["global_step"] == 1
    final = json.loads((run_dir / "metrics.json").read_text())
    assert set(final) == {"val/accuracy", "val/f1", "val/score"}
    # in-fit validation (sharded over 2 ranks) saw every row once: it equals the single-process evaluation
    in_fit = json.loads(per_rank["0"].replace("'", '"'))
    for k in final:
        assert in_fit[k] == pytest.approx(final[k], abs=1e-6), (k, in_fit, final)
