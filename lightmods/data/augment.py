"""Unlabelled phrase rows for distillation: contiguous word spans of the training sentences.

GLUE's SST-2 training set is the 67k phrases of the parse trees of about 7k sentences; the shared sentence-level
split has the sentences alone. A student distilled from a teacher learns from the teacher's predictions, not
from labels, so spans of the training sentences stand in for those phrases (as TinyBERT-style augmentation
does for distillation) without a parser and without inventing labels: every span row is unlabelled
(``label: None``, encoded -100), which the label losses ignore and the distillation terms use.
"""

from __future__ import annotations

import random

from lightmods.config.schema import AugmentDataConfig
from lightmods.data.tasks import TaskSpec


def span_rows(rows: list[dict], task: TaskSpec, cfg: AugmentDataConfig, seed: int) -> list[dict]:
    """Up to ``cfg.spans`` distinct spans per row, of ``cfg.min_words`` words up to one word fewer than the
    sentence, each a new unlabelled row after the originals; deterministic under ``seed``."""
    (field,) = task.text_fields
    rng = random.Random(f"augment-spans-{seed}")
    out: list[dict] = []
    next_idx = max((int(r["idx"]) for r in rows), default=-1) + 1
    for row in rows:
        words = str(row[field]).split()
        longest = len(words) - 1
        if longest < cfg.min_words:
            continue
        seen: set[tuple[int, int]] = set()
        for _ in range(cfg.spans * 4):  # a few tries more than needed: short sentences have few spans
            if len(seen) == cfg.spans:
                break
            n = rng.randint(cfg.min_words, longest)
            start = rng.randint(0, len(words) - n)
            if (start, n) in seen:
                continue
            seen.add((start, n))
            out.append({**row, field: " ".join(words[start : start + n]), "label": None, "idx": next_idx})
            next_idx += 1
    return out
