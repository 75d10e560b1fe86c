"""Entry point: ``python train.py [group=option ...] [key=value ...]``; ``--help`` lists the groups."""

import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from lightmods.config import register_schemas  # noqa: E402
from lightmods.errors import ConfigError, DataError  # noqa: E402
from lightmods.sweep.jobs import child_argv  # noqa: E402

register_schemas()
# A DDP child that Lightning started for a job of a multirun runs that one job, not the whole sweep again.
sys.argv = child_argv(sys.argv) or sys.argv


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from lightmods.run import train
    from lightmods.sweep.jobs import in_multirun, job_scope, register_resolvers

    register_resolvers()  # again: a joblib worker unpickles this function without running the module above
    try:
        with job_scope(cfg):
            metrics = train(cfg)
    except (ConfigError, DataError) as e:
        print(f"lightmods: {type(e).__name__}: {e}", file=sys.stderr)
        if in_multirun():
            raise  # Hydra records the job as failed and runs the sweep's other jobs
        sys.exit(2)
    return metrics.get("val/score")


if __name__ == "__main__":
    main()
