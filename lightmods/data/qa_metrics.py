"""SQuAD scoring as a torchmetrics Metric: start/end logits of every evaluation window are gathered
(padded to the window length, so DDP can sync them), decoded into text answers and scored with the
official definitions. Values are percentages, as the official scripts report them."""

from __future__ import annotations

import torch
from torchmetrics.utilities import dim_zero_cat

from lightmods.data.metrics import BoundMetric
from lightmods.data.qa import postprocess_predictions
from lightmods.data.squad_metric import squad_scores
from lightmods.data.tasks import TaskSpec

PAD_LOGIT = -1e4


class SquadMetrics(BoundMetric):
    """Bound to the split's rows (gold answers) and window features (example ids, offsets)."""

    def __init__(self, task: TaskSpec, prefix: str = "val/", suffix: str = "", max_length: int = 384,
                 n_best: int = 20, max_answer_length: int = 30, null_threshold: float = 0.0, sync: bool = True):  # fmt: skip
        super().__init__(task, prefix, suffix, sync)
        self.max_length, self.n_best, self.max_answer_length, self.null_threshold = max_length, n_best, max_answer_length, null_threshold
        self.version_2 = task.builder == "squad_v2"
        self.add_state("idx", default=[], dist_reduce_fx="cat")
        self.add_state("start", default=[], dist_reduce_fx="cat")
        self.add_state("end", default=[], dist_reduce_fx="cat")

    def update_batch(self, logits: torch.Tensor, batch: dict) -> None:
        pad = self.max_length - logits.shape[1]
        logits = torch.nn.functional.pad(logits.float(), (0, 0, 0, pad), value=PAD_LOGIT) if pad > 0 else logits.float()
        self.idx.append(batch["idx"])
        self.start.append(logits[..., 0])
        self.end.append(logits[..., 1])

    def compute(self) -> dict[str, float]:
        self._check_bound()
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
