"""One Hydra job in its process: DDP children that rejoin it, a clean process for the next job, its sweep.

**DDP x multirun.** Lightning's DDP launcher (``strategy=ddp`` where no cluster starts the processes) re-runs the
script for ranks > 0 with the parent's command line plus ``hydra.run.dir=<run dir>``. Under ``-m`` that command
line is the whole sweep, so every child would start a multirun of its own, in new run dirs (Lightning #11300,
hydra #2070). lightmods fixes it without patching Lightning: while a job runs, its process publishes the job
(its own overrides, its run dir, its sweep) in the environment variable ``LIGHTMODS_JOB``, which the children
inherit; ``train.py`` started as a child (``LOCAL_RANK`` > 0 and ``LIGHTMODS_JOB`` set) replaces its command line
with that one job in RUN mode, writing into the job's run dir (:func:`child_argv`).

**Between jobs.** A DDP fit leaves Lightning's rank variables (``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_PORT``,
...) in ``os.environ`` and the default process group initialised; the next job of a sequential sweep would then
believe an external launcher started it and reuse a group whose other rank has exited. :func:`job_scope` restores
the environment and destroys the group after every job.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lightmods.errors import ConfigError

JOB_ENV = "LIGHTMODS_JOB"
# What Lightning's launchers and seed_everything put in os.environ during a fit.
DIST_ENV = (
    "LOCAL_RANK",
    "NODE_RANK",
    "WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "PL_GLOBAL_SEED",
    "PL_SEED_WORKERS",
)
# Hydra overrides a child must not inherit: it runs one job in RUN mode, in the parent job's run dir.
_NOT_FOR_CHILDREN = (
    "hydra.mode", "hydra.run", "hydra.sweep", "hydra.sweeper", "hydra/sweeper", "hydra.launcher", "hydra/launcher",
    "hydra.output_subdir", "hydra.job.name", "hydra.callbacks", "hydra/callbacks",
)  # fmt: skip
# Command-line flags that choose the primary config; they travel to the child with their values.
_CONFIG_FLAGS = ("--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd")


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("~+")


def _quote(value: str) -> str:
    """A Hydra override value that survives a path with spaces, ``=``, ``:`` or quotes."""
    return "'" + value.replace("'", "\\'") + "'"


def _local_rank(environ) -> int:
    try:
        return int(environ.get("LOCAL_RANK", "0") or 0)
    except ValueError:
        return 0


def is_ddp_child(environ=None) -> bool:
    """This process is a rank > 0 that Lightning started for a lightmods job."""
    environ = os.environ if environ is None else environ
    return bool(environ.get(JOB_ENV)) and _local_rank(environ) > 0


def child_argv(argv: Sequence[str], environ=None) -> list[str] | None:
    """The command line a DDP child of a lightmods job runs: that job alone, in RUN mode, in its run dir.

    ``None`` when this process is not such a child (then the command line stays as it is).
    """
    environ = os.environ if environ is None else environ
    if not is_ddp_child(environ):
        return None
    job = json.loads(environ[JOB_ENV])
    flags: list[str] = []
    args = list(argv[1:])
    for i, arg in enumerate(args):
        name = arg.split("=", 1)[0]
        if name in _CONFIG_FLAGS:
            flags.append(arg)
            if "=" not in arg and i + 1 < len(args):
                flags.append(args[i + 1])
    return [
        argv[0], *flags, *job["overrides"], *job["hydra_overrides"],
        f"hydra.run.dir={_quote(job['output_dir'])}", "hydra.mode=RUN", "hydra.output_subdir=null",
        f"hydra.job.name=train_ddp_process_{_local_rank(environ)}",
    ]  # fmt: skip


def _hydra_config():
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def in_multirun() -> bool:
    """This job is one of a multirun (or a DDP child of one)."""
    from hydra.types import RunMode

    hc = _hydra_config()
    if hc is not None and hc.mode == RunMode.MULTIRUN:
        return True
    return is_ddp_child() and json.loads(os.environ[JOB_ENV]).get("sweep_dir") is not None


def sweep_group() -> str | None:
    """The sweep a job belongs to (its sweep dir, as configured, e.g. ``logs/train/multiruns/<time>``): the W&B
    group of every job of one multirun. ``None`` for a single run. Registered as ``${lightmods.sweep_group:}``."""
    from hydra.types import RunMode

    if is_ddp_child():
        return json.loads(os.environ[JOB_ENV]).get("sweep_dir")
    hc = _hydra_config()
    if hc is None or hc.mode != RunMode.MULTIRUN:
        return None
    return str(hc.sweep.dir)[-128:]  # W&B caps group names at 128 characters


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("lightmods.sweep_group", sweep_group, replace=True)


def describe_job() -> dict[str, Any] | None:
    """What a DDP child needs to rejoin the running Hydra job; ``None`` outside Hydra."""
    from hydra.types import RunMode

    hc = _hydra_config()
    if hc is None:
        return None
    return {
        "overrides": list(hc.overrides.task),
        "hydra_overrides": [
            o for o in hc.overrides.hydra if not _override_key(o).startswith(_NOT_FOR_CHILDREN)
        ],
        "output_dir": str(Path(hc.runtime.output_dir).resolve()),
        "sweep_dir": str(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else None,
    }


def _relaunches_script(trainer_cfg) -> bool:
    """Would Lightning start this job's other ranks by re-running the script?"""
    strategy = str(getattr(trainer_cfg, "strategy", "auto"))
    devices = getattr(trainer_cfg, "devices", "auto")
    if not strategy.startswith("ddp") or any(s in strategy for s in ("spawn", "fork", "notebook")):
        return False
    return not (
        devices in (1, "1")
        or (isinstance(devices, Sequence) and not isinstance(devices, str) and len(devices) == 1)
    )


def check_launcher(cfg) -> None:
    """Refuse what cannot work: a script-relaunching DDP job inside a joblib worker (the child would re-run the
    worker, not train.py)."""
    hc = _hydra_config()
    launcher = str(hc.launcher.get("_target_", "")) if hc is not None and "launcher" in hc else ""
    if "joblib" in launcher.lower() and _relaunches_script(cfg.trainer):
        raise ConfigError(
            f"trainer.strategy={cfg.trainer.strategy} with trainer.devices={cfg.trainer.devices} is not accepted under "
            "hydra/launcher=joblib; accepted: one device per job (joblib runs jobs in worker processes that Lightning "
            "cannot re-launch), or DDP jobs with the basic launcher (one job at a time) or hydra/launcher=slurm"
        )


@contextmanager
def job_scope(cfg=None) -> Iterator[None]:
    """Around one job in the process that runs it: publish the job for its DDP children, and afterwards undo what
    a DDP fit leaves in the process, so the next job of a sweep starts clean. A no-op in a DDP child."""
    if is_ddp_child():
        yield
        return
    if cfg is not None:
        check_launcher(cfg)
    saved = {k: os.environ.get(k) for k in (JOB_ENV, *DIST_ENV)}
    job = describe_job()
    if job is not None:
        os.environ[JOB_ENV] = json.dumps(job)
    group_before = _process_group_initialized()
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if not group_before and _process_group_initialized():
            import torch.distributed as dist

            dist.destroy_process_group()


def _process_group_initialized() -> bool:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return False
    return dist.is_available() and dist.is_initialized()
