"""The Hydra callback behind ``sweep_summary.csv`` (configured in ``conf/hydra/default.yaml``).

Hydra's launchers catch a job's exception, mark the job failed and run the remaining jobs of the batch (the
basic launcher's batch is the whole sweep); the sweep then re-raises the first failure, so ``on_multirun_end``
is skipped and the command exits with status 1. This callback therefore works per job: after every job
(finished or failed) it records a failure in that job's ``summary.json`` (``status: failed`` and the error,
when the run could not write them itself, e.g. a config error) and rebuilds the sweep's summary, so the file is
complete whatever happens next; ``on_multirun_end`` rebuilds it once more.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lightmods.sweep.summary import FILENAME, collect, read_json, status_counts, write_summary
from lightmods.utils.run_files import RunFiles

log = logging.getLogger("lightmods")


def _is_multirun(config: DictConfig) -> bool:
    return str(OmegaConf.select(config, "hydra.mode", default="")).endswith("MULTIRUN")


def _global_rank() -> int:
    """Under SLURM (submitit) every task of a job runs it; only rank 0 writes."""
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


class SweepSummary(Callback):
    def __init__(self, filename: str = FILENAME) -> None:
        self.filename = filename

    def _write(self, sweep_dir: Path) -> Path:
        return write_summary(sweep_dir, sweep_dir / self.filename)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if not _is_multirun(config) or _global_rank() != 0:
            return
        run_dir = Path(OmegaConf.select(config, "hydra.runtime.output_dir"))
        if job_return.status == JobStatus.FAILED:
            error = job_return._return_value  # the exception (``return_value`` re-raises it)
            figures = {"status": "failed"}
            if "error" not in read_json(run_dir / "summary.json"):  # the run's own record of its error stays
                figures["error"] = f"{type(error).__name__}: {error}"
            RunFiles(run_dir).update_summary(figures)
        self._write(Path(str(config.hydra.sweep.dir)))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if _global_rank() != 0:
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        path = self._write(sweep_dir)
        counts = status_counts(collect(sweep_dir))
        log.info("sweep summary: %s (%s)", path, ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
