"""Cross-entropy over the labelled rows of a batch only.

Unlabelled rows (label -100: distillation-only span rows, test rows) are ignored; a batch without a single
label gives a zero that keeps the graph, where ``F.cross_entropy`` would give NaN (0 / 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def labelled_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    keep = labels != -100
    if bool(keep.all()):
        return F.cross_entropy(logits.float(), labels)
    if not bool(keep.any()):
        return logits.float().sum() * 0.0
    return F.cross_entropy(logits.float()[keep], labels[keep])
