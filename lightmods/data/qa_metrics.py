"""SQuAD scoring as a torchmetrics Metric: start/end logits of every evaluation window are gathered
(padded to the window length, so DDP can sync them), decoded into text answers and scored with the
official definitions. Values are percentages, as the official scripts report them."""

from __future__ import annotations

import torch
import torchmetrics
from torchmetrics.utilities import dim_zero_cat

from lightmods.data.qa import postprocess_predictions
from lightmods.data.squad_metric import squad_scores
from lightmods.data.tasks import TaskSpec

PAD_LOGIT = -1e4


class SquadMetrics(torchmetrics.Metric):
    """Call :meth:`bind` with the split's rows and window features before computing."""

    full_state_update = False

    def __init__(self, task: TaskSpec, prefix: str = "val/", suffix: str = "", max_length: int = 384,
                 n_best: int = 20, max_answer_length: int = 30, null_threshold: float = 0.0, sync: bool = True):  # fmt: skip
        super().__init__(sync_on_compute=sync)
        self.task, self.prefix, self.suffix = task, prefix, suffix
        self.max_length, self.n_best, self.max_answer_length, self.null_threshold = max_length, n_best, max_answer_length, null_threshold
        self.version_2 = task.builder == "squad_v2"
        self.rows: list[dict] | None = None
        self.features: dict | None = None
        self.last_predictions: dict[str, str] = {}
        self.add_state("idx", default=[], dist_reduce_fx="cat")
        self.add_state("start", default=[], dist_reduce_fx="cat")
        self.add_state("end", default=[], dist_reduce_fx="cat")

    def bind(self, rows: list[dict], features: dict) -> SquadMetrics:
        self.rows, self.features = rows, features
        return self

    def update_batch(self, logits: torch.Tensor, batch: dict) -> None:
        pad = self.max_length - logits.shape[1]
        logits = torch.nn.functional.pad(logits.float(), (0, 0, 0, pad), value=PAD_LOGIT) if pad > 0 else logits.float()
        self.idx.append(batch["idx"])
        self.start.append(logits[..., 0])
        self.end.append(logits[..., 1])

    def update(self, *args, **kwargs) -> None:  # torchmetrics requires it; update_batch is the entry point
        self.update_batch(*args, **kwargs)

    def compute(self) -> dict[str, float]:
        if self.rows is None:
            raise RuntimeError("SquadMetrics.bind(rows, features) was not called")
        idx = dim_zero_cat(self.idx).cpu()
        start, end = dim_zero_cat(self.start).cpu(), dim_zero_cat(self.end).cpu()
        first = {}
        for pos, i in enumerate(idx.tolist()):  # a distributed sampler repeats a few windows: keep one
            first.setdefault(i, pos)
        order = sorted(first)
        keep = torch.tensor([first[i] for i in order], dtype=torch.long)
        features = {k: [v[i] for i in order] for k, v in self.features.items()}
        example_ids = set(features["example_id"])
        rows = [r for r in self.rows if r["id"] in example_ids]
        preds, _ = postprocess_predictions(
            rows, features, start[keep].numpy(), end[keep].numpy(), n_best=self.n_best,
            max_answer_length=self.max_answer_length, version_2=self.version_2,
            null_score_diff_threshold=self.null_threshold,
        )  # fmt: skip
        self.last_predictions = preds
        scores = squad_scores(preds, rows, version_2=self.version_2)
        return {f"{self.prefix}{k}{self.suffix}": float(v) for k, v in scores.items() if not k.endswith("total")}
