"""What the distilling compression methods share (``mask_prune``, ``wid``): loading the fine-tuned teacher from an
``export/`` folder and checking it is the student's architecture, giving the student the teacher's weights
(layers the method wrapped take their plain layer's weights), one cached teacher forward per batch, and the
logit-distillation loss (soft cross-entropy; token-level logits average over the non-padding tokens).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lightmods.errors import config_error
from lightmods.losses.distill import soft_cross_entropy

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
ARCH_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
WRAPPED = ".base_layer."  # how a wrapped layer (adapters, compactors) names the plain layer it keeps


def load_teacher(path: str, student: nn.Module, key: str = "method.teacher") -> nn.Module:
    """The frozen, eval-mode teacher exported at ``path``; fails naming ``key`` when it is missing or not the
    student's (unpruned) architecture."""
    from pathlib import Path

    from lightmods.export import load_export

    if not (Path(path) / "lightmods.json").is_file():
        raise config_error(key, path, "an export/ folder of a fine-tuned run (with lightmods.json)")
    teacher = load_export(path)
    for k in ARCH_KEYS:
        t, s = getattr(teacher.config, k, None), getattr(student.config, k, None)
        if t != s:
            raise config_error(key, path, f"an export of the unpruned model's architecture (its {k}={t!r}, the student's {s!r})")
    teacher.requires_grad_(False)
    return teacher.eval()


def inherit_weights(student: nn.Module, teacher: nn.Module, path: str, own: Callable[[str], bool], key: str = "method.teacher") -> None:
    """Load the teacher's weights into ``student``. A student entry ``a.base_layer.b`` takes the teacher's ``a.b``;
    entries for which ``own(name)`` holds (gates, compactors) keep their initialisation. Every other student
    entry must be in the teacher with the same shape, and every teacher entry must be used."""
    t = teacher.state_dict()
    mapped, missing = {}, []
    for name, value in student.state_dict().items():
        src = name.replace(WRAPPED, ".")
        if src in t and t[src].shape == value.shape:
            mapped[name] = t[src]
        elif not own(name):
            missing.append(name)
    unused = set(t) - {n.replace(WRAPPED, ".") for n in mapped}
    if missing or unused:
        what = f"student entries without a teacher weight {missing[:3]}" if missing else f"teacher entries the student has not {sorted(unused)[:3]}"
        raise config_error(key, path, f"an export whose weights fit the student ({what})")
    student.load_state_dict(mapped, strict=False)


class TeacherCache:
    """The teacher's logits (and whatever its hooks collect into ``teacher.teacher_hidden``) for a batch, one
    forward per batch: several loss terms of one step share it."""

    def __init__(self):
        self._key = None
        self._value: tuple | None = None

    @torch.no_grad()
    def get(self, teacher: nn.Module, batch: dict, device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
        key = batch["input_ids"]  # the tensor itself (an id() could be reused by the next batch)
        if self._value is not None and self._key is key:
            return self._value
        if next(teacher.parameters()).device != device:
            teacher.to(device)
        teacher.teacher_hidden = []
        logits = teacher(**{k: batch[k] for k in MODEL_INPUTS if k in batch}).logits
        self._key, self._value = key, (logits, list(teacher.teacher_hidden))
        return self._value


def logit_kd(student: torch.Tensor, teacher: torch.Tensor, batch: dict, temperature: float = 1.0) -> torch.Tensor:
    """Soft cross-entropy of the student's logits against the teacher's: per row for sequence-level logits,
    per token averaged over the non-padding tokens for token-level ones (causal LM: ``(batch, length, vocab)``)."""
    teacher = teacher.view_as(student)
    mask = batch.get("attention_mask")
    if student.dim() == 3 and mask is not None and mask.shape == student.shape[:2]:
        keep = mask.bool()
        return soft_cross_entropy(student[keep], teacher[keep], temperature)
    return soft_cross_entropy(student, teacher, temperature)
