"""Entry point: ``python train.py [group=option ...] [key=value ...]``; ``--help`` lists the groups."""

import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from lightmods.config import register_schemas  # noqa: E402
from lightmods.errors import ConfigError, DataError  # noqa: E402

register_schemas()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from lightmods.run import train

    try:
        metrics = train(cfg)
    except (ConfigError, DataError) as e:
        print(f"lightmods: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(2)
    return metrics.get("val/score")


if __name__ == "__main__":
    main()
