"""Multiruns: sweep files, launchers, sweep_summary.csv, DDP x multirun, W&B grouping, the analysis notebook."""

from __future__ import annotations

import csv
import itertools
import json
import logging
import os
import re
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from lightmods.config import validate
from lightmods.errors import ConfigError
from lightmods.sweep import analysis, jobs
from lightmods.sweep.callbacks import SweepSummary
from lightmods.sweep.summary import FILENAME, main, write_summary
from tests.conftest import CONF, FAST, ROOT, compose_run, run_cli

SWEEP_FILES = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml") if "sweeper:" in p.read_text())


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ---- DDP children and the job scope -------------------------------------------------------------------------
def test_ddp_child_runs_its_job_alone_in_run_mode():
    job = {
        "overrides": ["method.rank=4", "model=tiny"], "hydra_overrides": ["hydra.verbose=true"],
        "output_dir": "/tmp/sweep/it's/0", "sweep_dir": "logs/train/multiruns/x",
    }  # fmt: skip
    env = {jobs.JOB_ENV: json.dumps(job), "LOCAL_RANK": "1"}
    # what Lightning runs for rank 1: the parent's whole command line plus its own hydra.* additions
    argv = [
        "/r/train.py",
        "-m",
        "--config-name",
        "train",
        "method.rank=4,8",
        "model=tiny",
        'hydra.run.dir="x"',
    ]
    assert jobs.child_argv(argv, env) == [
        "/r/train.py", "--config-name", "train", "method.rank=4", "model=tiny", "hydra.verbose=true",
        "hydra.run.dir='/tmp/sweep/it\\'s/0'", "hydra.mode=RUN", "hydra.output_subdir=null", "hydra.job.name=train_ddp_process_1",
    ]  # fmt: skip
    run_dir = OverridesParser.create().parse_overrides([jobs.child_argv(argv, env)[6]])[0]
    assert run_dir.value() == "/tmp/sweep/it's/0"  # quoted for Hydra's parser
    assert jobs.child_argv(argv, {**env, "LOCAL_RANK": "0"}) is None  # rank 0 is the job itself
    assert jobs.child_argv(argv, {"LOCAL_RANK": "1"}) is None  # a child of a script that is not lightmods'


def test_job_scope_publishes_the_job_and_restores_the_process(monkeypatch):
    monkeypatch.delenv(jobs.JOB_ENV, raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("MASTER_PORT", "1234")
    compose_run(["hydra.mode=MULTIRUN", "method.rank=4"])  # a Hydra job of a multirun
    from hydra.core.hydra_config import HydraConfig

    with open_dict_runtime() as hc:
        hc.runtime.output_dir = "/tmp/job0"
        with jobs.job_scope():
            job = json.loads(os.environ[jobs.JOB_ENV])
            assert job["overrides"] == ["method.rank=4"] and job["output_dir"] == "/tmp/job0"
            assert job["sweep_dir"] == str(HydraConfig.get().sweep.dir) == jobs.sweep_group()
            os.environ["LOCAL_RANK"] = "0"  # what a DDP fit leaves behind
            os.environ["MASTER_PORT"] = "999"
    assert (
        jobs.JOB_ENV not in os.environ
        and "LOCAL_RANK" not in os.environ
        and os.environ["MASTER_PORT"] == "1234"
    )


class open_dict_runtime:
    """HydraConfig's runtime node made writable (compose() leaves output_dir unset)."""

    def __enter__(self):
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import open_dict, read_write

        cfg = HydraConfig.instance().cfg
        self._ctx = [read_write(cfg.hydra.runtime), open_dict(cfg.hydra.runtime)]
        for c in self._ctx:
            c.__enter__()
        return cfg.hydra

    def __exit__(self, *exc):
        for c in reversed(self._ctx):
            c.__exit__(*exc)


def test_sweep_group_is_none_for_a_single_run():
    cfg = compose_run(["logger=wandb"])
    assert cfg.logger.wandb.group is None and cfg.logger.wandb.name == "logger=wandb"
    assert list(cfg.logger.wandb.tags) == ["minilm", "demo"] and cfg.logger.wandb.job_type == "lora"


def test_ddp_jobs_are_refused_under_joblib():
    cfg = compose_run(["hydra/launcher=parallel", "hydra.mode=MULTIRUN", "trainer=ddp_cpu"])
    with pytest.raises(ConfigError, match="hydra/launcher=joblib"):
        jobs.check_launcher(cfg)
    jobs.check_launcher(compose_run(["hydra/launcher=parallel", "hydra.mode=MULTIRUN", "trainer=cpu"]))


# ---- sweep_summary.csv ----------------------------------------------------------------------------------------
def make_run(
    root: Path, num: int, overrides: list[str], metrics: dict | None = None, summary: dict | None = None
) -> Path:
    d = root / str(num)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides))
    (d / ".hydra" / "hydra.yaml").write_text(
        f"hydra:\n  run:\n    dir: ${{now:%H}}\n  job:\n    num: {num}\n"
    )
    if metrics is not None:
        (d / "metrics.json").write_text(json.dumps(metrics))
    if summary is not None:
        (d / "summary.json").write_text(json.dumps(summary))
    return d


def test_summary_has_one_row_per_job_with_overrides_metrics_and_figures(tmp_path, capsys):
    make_run(tmp_path, 10, ["method=lora", "+x=1"], {"val/score": 0.5}, {"status": "completed", "params_trainable": 7, "params_by_role": {"head": {"total": 3}}, "heads_kept_per_layer": [2, 1]})  # fmt: skip
    make_run(tmp_path, 2, ["method=adapter"], None, {"status": "failed", "error": "RuntimeError: boom"})
    make_run(tmp_path, 3, ["method=full_ft"])  # killed before any figure
    (tmp_path / ".submitit" / "1").mkdir(parents=True)  # launcher files are not runs
    path = write_summary(tmp_path)
    rows = read_csv(path)
    assert [r["job"] for r in rows] == ["2", "3", "10"]  # by job number, not by name
    assert [r["status"] for r in rows] == ["failed", "incomplete", "completed"]
    assert list(rows[0])[:5] == ["job", "run_dir", "status", "overrides", "override/method"]
    done = rows[2]
    assert (
        done["overrides"] == "method=lora +x=1"
        and done["override/method"] == "lora"
        and done["override/x"] == "1"
    )
    assert (
        done["val/score"] == "0.5"
        and done["params_trainable"] == "7"
        and done["params_by_role.head.total"] == "3"
    )
    assert json.loads(done["heads_kept_per_layer"]) == [2, 1] and rows[0]["error"] == "RuntimeError: boom"
    # the command rebuilds the same file from the run dirs
    path.unlink()
    assert main([str(tmp_path)]) == 0
    assert (
        read_csv(path) == rows and "3 runs (1 completed, 1 failed, 1 incomplete)" in capsys.readouterr().out
    )


def test_callback_records_a_failed_job_and_keeps_the_finished_ones(tmp_path):
    make_run(tmp_path, 0, ["seed=1"], {"val/score": 0.7}, {"status": "completed"})
    failed = make_run(tmp_path, 1, ["seed=2"])  # e.g. a config error: the run wrote nothing itself
    config = OmegaConf.create(
        {
            "hydra": {
                "mode": "MULTIRUN",
                "sweep": {"dir": str(tmp_path)},
                "runtime": {"output_dir": str(failed)},
            }
        }
    )
    ret = JobReturn(status=JobStatus.FAILED, _return_value=ConfigError("method.rank=-1 is not accepted"))
    SweepSummary().on_job_end(config, ret)
    assert json.loads((failed / "summary.json").read_text()) == {
        "status": "failed",
        "error": "ConfigError: method.rank=-1 is not accepted",
    }
    rows = read_csv(tmp_path / FILENAME)
    assert [(r["job"], r["status"], r["val/score"]) for r in rows] == [
        ("0", "completed", "0.7"),
        ("1", "failed", ""),
    ]
    single = OmegaConf.create(
        {
            "hydra": {
                "mode": "RUN",
                "sweep": {"dir": str(tmp_path / "x")},
                "runtime": {"output_dir": str(failed)},
            }
        }
    )
    SweepSummary().on_job_end(single, ret)
    assert not (tmp_path / "x").exists()  # single runs have no sweep summary


def test_analysis_table_averages_seeds_and_counts_failures(tmp_path):
    for i, (method, seed, score, status) in enumerate(
        [("lora", 1, 0.6, "completed"), ("lora", 2, 0.8, "completed"), ("adapter", 1, None, "failed")]
    ):
        pruned = {"params_final": 600} if i == 1 else {}  # a pruning method reports the final size apart
        make_run(tmp_path, i, [f"method={method}", f"seed={seed}"], {"val/score": score} if score else None, {"status": status, "params_trainable": 10 * (i + 1), "params_total": 1000, "flops_per_sample": 100, **pruned})  # fmt: skip
    runs = analysis.load_runs(tmp_path)  # no csv yet: built from the run dirs
    assert analysis.varying_overrides(runs) == ["override/method"]
    table = analysis.ablation_table(runs)
    assert (
        table.loc["lora", "val/score mean"] == pytest.approx(0.7)
        and table.loc["lora", "val/score count"] == 2
    )
    assert table.loc["adapter", "not completed"] == 1 and table.loc["lora", "params_trainable"] == 15
    points = analysis.efficiency_points(runs)
    assert set(points) == {"trainable parameters", "total parameters", "inference FLOPs per sample"}
    assert list(points["trainable parameters"][1]["label"]) == ["method=lora", "method=lora"]
    assert list(points["total parameters"][1]["x"]) == [1000, 600] and table.loc["lora", "params_final"] == 800


def test_wandb_export_reads_as_a_summary(tmp_path):
    export = tmp_path / "wandb_export.csv"
    export.write_text(
        "Name,State,ID,val/score,summary/params_trainable\n"
        '"method=lora,method.target_modules=[query,value]",finished,a1,0.9,10\n'
        "method=adapter,failed,b2,,\n"
    )
    df = analysis.load_wandb_export(export)
    assert list(df["status"]) == ["completed", "failed"]
    assert (
        df.loc[0, "override/method.target_modules"] == "[query,value]" and df.loc[0, "params_trainable"] == 10
    )
    table = analysis.ablation_table(df)
    assert table.index.names == ["method", "method.target_modules"]
    assert table.loc[("lora", "[query,value]"), "val/score mean"] == pytest.approx(0.9)


# ---- sweep files and launchers --------------------------------------------------------------------------------
def sweep_jobs(experiment: str, extra: tuple[str, ...] = ()) -> tuple[list[list[str]], str]:
    """The sweep file's jobs (the basic sweeper's cartesian product of its params) and its header."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", *extra], return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    axes = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] for o in parsed]
    return [list(job) for job in itertools.product(*axes)], (
        CONF / "experiment" / f"{experiment}.yaml"
    ).read_text()


@pytest.mark.parametrize("experiment", SWEEP_FILES)
def test_every_sweep_file_composes_and_validates_its_jobs(experiment, tmp_path):
    all_jobs, text = sweep_jobs(experiment)
    assert f"# python train.py -m experiment={experiment}" in text.splitlines()[1]
    stated = re.search(r"(\d+) jobs", text)
    assert stated and int(stated.group(1)) == len(all_jobs), (experiment, len(all_jobs))
    # the first and the last job, and every option of a group axis but method
    covering = {tuple(all_jobs[0])}
    covering.add(tuple(all_jobs[-1]))
    for i, choice in enumerate(all_jobs[0]):
        key = choice.split("=", 1)[0]
        if (
            "." not in key and key != "method"
        ):  # group axes (attack, defense): every option; methods: tests/test_train.py
            covering.update(tuple(job) for job in {job[i]: job for job in all_jobs}.values())
    for job in sorted(covering):
        rc = validate(compose_run([f"experiment={experiment}", *job], tmp_path))
        assert rc.data.task and rc.method.name, job


def test_moslora_lora_baseline_command_in_its_header_composes(tmp_path):
    rc = validate(
        compose_run(["experiment=moslora_roberta_base_sst2", "method=lora", "method.rank=8"], tmp_path)
    )
    assert rc.method.name == "lora" and rc.method.alpha == 32 and len(rc.method.target_modules) == 5


def test_slurm_launcher_takes_the_job_shape_from_the_trainer():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra.utils import instantiate

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"], return_hydra_config=True)  # fmt: skip
    launcher = cfg.hydra.launcher
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.nodes) == (4, 4, 2)
    assert launcher._target_.endswith("SlurmLauncher") and launcher.max_num_timeout == 0
    assert type(instantiate(launcher)).__name__ == "SlurmLauncher"


# ---- real sweeps ----------------------------------------------------------------------------------------------
def run_train_main(*args: str) -> int:
    """``python train.py <args>`` in this process (Hydra's entry point, without a new interpreter)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import train as entry

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    argv = sys.argv
    GlobalHydra.instance().clear()
    sys.argv = [
        "train.py",
        "--config-path",
        str(CONF),
        *args,
    ]  # imported as a module, Hydra cannot find conf/ itself
    try:
        entry.main()
        return 0
    except SystemExit as e:
        return int(e.code or 0)
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()
        for h in root.handlers[:]:
            if h not in handlers:
                root.removeHandler(h)
                h.close()
        root.setLevel(level)


@pytest.fixture(scope="module")
def small_sweep(tmp_path_factory):
    """Four tiny jobs through the joblib launcher (in this process: n_jobs=1), with W&B offline; two fail."""
    import wandb

    log_dir = tmp_path_factory.mktemp("sweep") / "logs"
    seen = []
    real_finish = wandb.finish

    def finish(exit_code=None, **kw):  # the run as W&B has it, just before it is finished
        if wandb.run is not None:
            r = wandb.run
            seen.append({"group": r.group, "name": r.name, "job_type": r.job_type, "config": dict(r.config), "summary": dict(r.summary), "exit_code": exit_code})  # fmt: skip
        return real_finish(exit_code=exit_code, **kw)

    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setattr(wandb, "finish", finish)
    try:
        code = run_train_main(
            "-m", "hydra/launcher=parallel", "hydra.launcher.n_jobs=1", *FAST, "logger=[csv,wandb]",
            "method=lora,adapter", "optim.warmup_ratio=0.1,2.0", f"paths.log_dir={log_dir}",
        )  # fmt: skip
    finally:
        mp.undo()
    return code, log_dir, seen


def test_small_sweep_summary_wandb_groups_and_failures(small_sweep):
    code, log_dir, seen = small_sweep
    (sweep,) = (log_dir / "train" / "multiruns").iterdir()
    assert code != 0  # jobs failed: the command says so, after running every job
    rows = read_csv(sweep / FILENAME)
    assert [r["job"] for r in rows] == ["0", "1", "2", "3"]
    by = {(r["override/method"], r["override/optim.warmup_ratio"]): r for r in rows}
    for method in ("lora", "adapter"):
        done, failed = by[(method, "0.1")], by[(method, "2.0")]
        assert done["status"] == "completed" and 0 <= float(done["val/score"]) <= 1
        assert (
            float(done["flops_per_sample"]) > 0
            and float(done["params_trainable"]) > 0
            and float(done["train_samples_per_s"]) > 0
        )
        assert (
            failed["status"] == "failed"
            and "optim.warmup_ratio=2.0" in failed["error"]
            and failed["val/score"] == ""
        )
        assert (sweep / failed["run_dir"] / ".hydra" / "config.yaml").exists()
    assert rows == collect_rows(sweep)  # rebuilt from the run dirs: the same table
    # W&B: one group per sweep, runs named by their overrides, job type = method, resolved config, final figures
    done = [r for r in rows if r["status"] == "completed"]
    assert len(seen) == len(done)
    assert {s["group"] for s in seen} == {str(sweep)[-128:]}
    assert {s["job_type"] for s in seen} == {r["override/method"] for r in done}
    for s in seen:
        assert (
            f"method={s['job_type']}" in s["name"]
            and "optim.warmup_ratio=0.1" in s["name"]
            and s["exit_code"] == 0
        )
        assert s["config"]["method"]["name"] == s["job_type"] and s["config"]["paths"][
            "output_dir"
        ].startswith(str(sweep))
        assert s["summary"]["summary/status"] == "completed" and "val/score" in s["summary"]


def collect_rows(sweep: Path) -> list[dict]:
    out = sweep / "rebuilt.csv"
    write_summary(sweep, out)
    return read_csv(out)


def test_notebook_runs_headless_on_the_sweep(small_sweep, tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    import nbformat

    _, log_dir, _ = small_sweep
    (sweep,) = (log_dir / "train" / "multiruns").iterdir()
    monkeypatch.setenv("LIGHTMODS_SWEEP_DIR", str(sweep))
    monkeypatch.setenv("LIGHTMODS_FIGURES_DIR", str(tmp_path / "fig"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(ROOT / "notebooks" / "ablation_analysis.ipynb", as_version=4)
    nbclient.NotebookClient(
        nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    ).execute()
    names = {p.name for p in (tmp_path / "fig").iterdir()}
    assert {
        "ablation_table.csv",
        "efficiency.png",
        "training_curves.png",
        "val_score_vs_trainable_parameters.png",
    } <= names
    assert (
        "val_score_vs_inference_FLOPs_per_sample.png" in names
        and "val_score_vs_training_samples_per_s.png" in names
    )
    text = "".join(
        o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
    )
    assert "4 runs" in text and "ConfigError: optim.warmup_ratio=2.0" in text


@pytest.mark.slow
def test_ddp_multirun_one_run_dir_per_job_and_single_process_metrics(tmp_path):
    log_dir = tmp_path / "logs"
    r = run_cli(
        "-m", "experiment=smoke_tiny", "data.max_train_samples=64", "data.max_eval_samples=47", "callbacks.progress_bar=false",
        "trainer=ddp_cpu", "trainer.max_epochs=1", "method.rank=4,-1,8", f"paths.log_dir={log_dir}",
    )  # fmt: skip
    assert r.returncode == 1, r.stderr[-3000:]  # the middle job fails (config error); the others still run
    # exactly one sweep, one run dir per job: no child started a multirun or a run of its own
    assert sorted(p.relative_to(log_dir).parts[:2] for p in log_dir.glob("*/*")) == [("train", "multiruns")]
    (sweep,) = (log_dir / "train" / "multiruns").iterdir()
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1", "2"]
    assert len(list(sweep.rglob("multirun.yaml"))) == 1 and len(list(log_dir.rglob("config.yaml"))) == 3
    rows = {r["job"]: r for r in read_csv(sweep / FILENAME)}
    assert [rows[j]["status"] for j in "012"] == ["completed", "failed", "completed"]
    for job in ("0", "2"):
        run_dir = sweep / job
        logs = "".join(p.read_text() for p in run_dir.glob("*.log"))
        per_rank = dict(re.findall(r"rank (\d) validation metrics at the end of fit: (\{.*\})", logs))
        assert set(per_rank) == {"0", "1"} and per_rank["0"] == per_rank["1"], logs[-2000:]
        final = json.loads((run_dir / "metrics.json").read_text())
        in_fit = json.loads(per_rank["0"].replace("'", '"'))  # sharded over 2 ranks, every row once
        for k in final:
            assert in_fit[k] == pytest.approx(final[k], abs=1e-6), (job, k, in_fit, final)
        assert json.loads((run_dir / "summary.json").read_text())["global_step"] == 1
