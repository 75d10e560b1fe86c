"""ReCoRD scoring: per query, the candidate entity with the highest "is the answer" score is the
prediction; EM and token F1 are the maxima over the gold answers (SQuAD normalisation), as fractions."""

from __future__ import annotations

import torch
from torchmetrics.utilities import dim_zero_cat

from lightmods.data.metrics import BoundMetric
from lightmods.data.squad_metric import exact_match_score, f1_score
from lightmods.data.tasks import TaskSpec


class RecordMetrics(BoundMetric):
    """Bound to the split's rows (gold answers) and candidate features (entity text, query group)."""

    def __init__(self, task: TaskSpec, prefix: str = "val/", suffix: str = "", sync: bool = True):
        super().__init__(task, prefix, suffix, sync)
        self.add_state("idx", default=[], dist_reduce_fx="cat")
        self.add_state("score", default=[], dist_reduce_fx="cat")

    def update_batch(self, logits: torch.Tensor, batch: dict) -> None:
        self.idx.append(batch["idx"])
        self.score.append((logits[:, 1] - logits[:, 0]).float())

    def compute(self) -> dict[str, float]:
        self._check_bound()
        best: dict[int, tuple[float, str]] = {}
        for i, s in zip(dim_zero_cat(self.idx).tolist(), dim_zero_cat(self.score).tolist()):
            group, entity = self.features["group"][i], self.features["candidate"][i]
            if group not in best or s > best[group][0]:
                best[group] = (s, entity)
        self.last_predictions = {g: e for g, (_, e) in best.items()}
        em, f1, n = 0.0, 0.0, 0
        for g, entity in self.last_predictions.items():
            gold = self.rows[g]["answers"]
            if not gold:
                continue
            em += max(exact_match_score(entity, a) for a in gold)
            f1 += max(f1_score(entity, a) for a in gold)
            n += 1
        n = max(n, 1)
        return {f"{self.prefix}f1{self.suffix}": f1 / n, f"{self.prefix}exact_match{self.suffix}": em / n}
