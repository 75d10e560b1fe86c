"""Quantization-aware training of generative and encoder models (Tao et al., ACL 2022, "Compression of
Generative Pre-trained Language Models via Quantization").

- **Module-wise dynamic scaling**: every targeted weight (all linear layers of the transformer blocks by
  default; the word embedding and the task head optionally) is quantized to ``bits`` bits with its own
  learnable clipping factor ``alpha``, initialised from the weight's statistics (``scale_init``) and trained
  with the straight-through estimator for the rounding (``lightmods/quant/quantizer.py``). The latent
  full-precision weights train too; activations stay in full precision.
- **Distillation from the full-precision teacher**, the frozen copy of the starting model (start from a
  fine-tuned model, ``model.name_or_path=<a method=full_ft export>``, as the paper does):
  ``loss = hard_weight * task + distill_weight * softCE(student logits, teacher logits)
  + contrast_weight * token-level InfoNCE`` (``lightmods/losses/contrastive.py``) between the last-layer token
  representations of student and teacher, with in-batch negatives plus a memory bank of ``memory_bank``
  earlier teacher tokens. The paper trains with the two distillation terms alone (``hard_weight=0``).
- Export: ``export/quantized.safetensors`` (bit-packed codes + per-module scales); ``summary.json`` gets the
  byte counts and compression rates (``lightmods/quant/export.py``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lightmods.config import checks
from lightmods.errors import config_error
from lightmods.losses.contrastive import TokenMemoryBank, token_contrastive_loss
from lightmods.losses.distill import soft_cross_entropy
from lightmods.methods.base import LossTerm, Method, MethodConfig, register_method
from lightmods.models.families import Family
from lightmods.peft import count_parameters
from lightmods.peft.inject import match_module
from lightmods.quant import (
    MAX_BITS,
    MIN_BITS,
    SCALE_INITS,
    quant_layers,
    quantize_embeddings,
    quantize_linears,
)

log = logging.getLogger("lightmods")

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "pixel_values")
# Every linear layer inside the transformer blocks, per family.
BLOCK_LINEARS = {
    "bert": (r"re:(.*\.)?layer\.\d+\..*",),
    "roberta": (r"re:(.*\.)?layer\.\d+\..*",),
    "vit": (r"re:(.*\.)?layer\.\d+\..*",),
    "llama": (r"re:(.*\.)?layers\.\d+\..*",),
}


@dataclass
class QuantConfig(MethodConfig):
    name: str = "quant"
    lr: float = 5e-5
    bits: int = 2  # weight bits, 2..8
    target_modules: list[str] | None = None  # null: every linear layer of the transformer blocks
    exclude_modules: list[str] = field(default_factory=list)
    quantize_embeddings: bool = True  # the word embedding (and an output layer tied to it)
    quantize_head: bool = False  # the task head's linear layers (classifier, pooler, lm_head)
    scale_init: str = "mse"  # mse | mean_abs | max_abs
    learn_scale: bool = True  # false: the clipping factors stay at their initial values (ablation)
    hard_weight: float = 0.0  # the task loss (labels)
    distill_weight: float = 1.0  # soft cross-entropy to the teacher's logits
    distill_temperature: float = 1.0
    contrast_weight: float = 0.1  # token-level contrastive distillation
    contrast_temperature: float = 0.1
    memory_bank: int = 4096  # earlier teacher tokens kept as extra negatives (0: in-batch negatives only)
    contrast_max_tokens: int = 1024  # tokens per batch that enter the contrastive term (a random subset)

    def __post_init__(self):
        super().__post_init__()
        checks.one_of("method.bits", self.bits, range(MIN_BITS, MAX_BITS + 1))
        checks.one_of("method.scale_init", self.scale_init, SCALE_INITS)
        for key in ("hard_weight", "distill_weight", "contrast_weight", "memory_bank"):
            checks.non_negative(f"method.{key}", getattr(self, key))
        for key in ("distill_temperature", "contrast_temperature", "contrast_max_tokens"):
            checks.positive(f"method.{key}", getattr(self, key))
        if self.hard_weight == self.distill_weight == self.contrast_weight == 0:
            raise config_error("method.hard_weight", self.hard_weight, "a number > 0 when method.distill_weight and method.contrast_weight are 0 (nothing would train)")
        if self.target_modules is not None and not self.target_modules:
            raise config_error("method.target_modules", self.target_modules, "null (every block linear layer) or a non-empty list of module-name patterns")


def last_hidden_hook(model: nn.Module, stash: dict) -> None:
    """Keep the output of the model's base (the last layer's token representations) in ``stash["hidden"]``."""

    def hook(_module, _args, output):
        stash["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    model.base_model.register_forward_hook(hook)


def task_logits(out, task) -> torch.Tensor:
    """The logits as ``TaskModule.forward`` shapes them."""
    if task.head == "qa":
        return torch.stack([out.start_logits, out.end_logits], dim=-1)
    if task.head == "multiple_choice":
        return out.logits.view(-1, task.num_choices)
    return out.logits


def logits_distillation(student: torch.Tensor, teacher: torch.Tensor, batch: dict, temperature: float, task) -> torch.Tensor:
    """Soft cross-entropy to the teacher's prediction: per example (classification), per token over the
    vocabulary (language modelling, padding left out), over positions for span starts and ends (QA); the
    squared difference for regression."""
    teacher = teacher.detach()
    if task.head == "qa":  # (B, L, 2): distributions over positions
        s, t = student.transpose(1, 2), teacher.transpose(1, 2)
        mask = batch.get("attention_mask")
        if mask is not None:
            neg = torch.finfo(torch.float32).min
            s = s.float().masked_fill(~mask.bool()[:, None, :], neg)
            t = t.float().masked_fill(~mask.bool()[:, None, :], neg)
        return soft_cross_entropy(s, t, temperature)
    if student.dim() == 3:  # (B, L, V): next-token distributions
        mask = batch.get("attention_mask")
        if mask is not None:
            return soft_cross_entropy(student[mask.bool()], teacher[mask.bool()], temperature)
        return soft_cross_entropy(student, teacher, temperature)
    if getattr(task, "is_regression", False):
        return F.mse_loss(student.float(), teacher.float())
    return soft_cross_entropy(student, teacher, temperature)


@register_method
class Quant(Method):
    name = "quant"
    Config = QuantConfig

    def __init__(self, config: QuantConfig):
        super().__init__(config)
        self.teacher: nn.Module | None = None
        self.bank = TokenMemoryBank(config.memory_bank) if config.memory_bank else None
        self.quantized: list[str] = []
        self._student: dict = {}
        self._teacher: dict = {}

    @property
    def needs_teacher(self) -> bool:
        return self.config.distill_weight > 0 or self.config.contrast_weight > 0

    def targets(self, family: Family) -> list[str]:
        c = self.config
        if c.target_modules:
            return list(c.target_modules)
        if family.name not in BLOCK_LINEARS:
            raise config_error("method.target_modules", None, f"module-name patterns (no default placement for the {family.name} family)")
        return list(BLOCK_LINEARS[family.name])

    def prepare(self, model: nn.Module, family: Family) -> nn.Module:
        from lightmods.callbacks.cost_eff import frozen_copy

        c = self.config
        self.family = family
        if self.needs_teacher:
            archs = getattr(model.config, "architectures", None) or []
            if c.distill_weight > 0 and type(model).__name__ not in archs:
                log.warning(
                    "method=quant: the teacher is the starting model and its %s head was not trained (the checkpoint "
                    "holds %s); start from a fine-tuned model (model.name_or_path=<export>) or set "
                    "method.hard_weight=1 method.distill_weight=0", type(model).__name__, archs or "no head",
                )  # fmt: skip
            self.teacher = frozen_copy(model)
            last_hidden_hook(self.teacher, self._teacher)
        heads = [rf"re:(.*\.)?{h}(\..*)?" for h in family.head_modules]
        patterns = self.targets(family) + (heads if c.quantize_head else [])
        self.quantized = []
        if c.quantize_embeddings:
            self.quantized += quantize_embeddings(model, c.bits, c.scale_init, c.learn_scale)
        exclude = [*c.exclude_modules, *([] if c.quantize_head else heads)]
        self.quantized += quantize_linears(model, patterns, exclude, c.bits, c.scale_init, c.learn_scale)
        model.requires_grad_(True)  # quantization-aware training updates the latent full-precision weights
        for name, module in model.named_modules():
            if not c.train_head and name and match_module(name, heads):
                module.requires_grad_(False)
        if not c.learn_scale:
            for _, layer in quant_layers(model):
                layer.quantizer.alpha.requires_grad_(False)
        last_hidden_hook(model, self._student)
        return model

    # ---- objective --------------------------------------------------------------------------------------
    def task_weight(self, step: int) -> float:
        return self.config.hard_weight

    def loss_terms(self) -> list[LossTerm]:
        return [LossTerm("quant", 1.0, self._objective)] if self.needs_teacher else []

    def _objective(self, module, batch: dict, logits: torch.Tensor) -> torch.Tensor:
        c = self.config
        with torch.no_grad():
            t_out = self.teacher(**{k: batch[k] for k in MODEL_INPUTS if k in batch})
        bs = logits.shape[0]
        loss = logits.new_zeros((), dtype=torch.float32)
        if c.distill_weight > 0:
            dist = logits_distillation(logits, task_logits(t_out, module.task), batch, c.distill_temperature, module.task)
            module.log("train/loss_distill", dist, batch_size=bs)
            loss = loss + c.distill_weight * dist
        if c.contrast_weight > 0:
            cont = self.contrastive(batch)
            module.log("train/loss_contrast", cont, batch_size=bs)
            loss = loss + c.contrast_weight * cont
        return loss

    def token_rows(self, batch: dict, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices of the (non-padding) token positions that enter the contrastive term, and their ids."""
        b, n = hidden.shape[:2]
        mask = batch.get("attention_mask")
        keep = mask.reshape(-1).bool() if mask is not None and mask.shape == (b, n) else torch.ones(b * n, dtype=torch.bool, device=hidden.device)
        rows = keep.nonzero().squeeze(1)
        if rows.numel() > self.config.contrast_max_tokens:
            rows = rows[torch.randperm(rows.numel(), device=rows.device)[: self.config.contrast_max_tokens]]
        ids = batch.get("input_ids")
        ids = ids.reshape(-1)[rows] if ids is not None and ids.shape == (b, n) else rows  # no ids: every token its own
        return rows, ids

    def contrastive(self, batch: dict) -> torch.Tensor:
        s_hidden, t_hidden = self._student["hidden"], self._teacher["hidden"]
        rows, ids = self.token_rows(batch, s_hidden)
        s = s_hidden.reshape(-1, s_hidden.shape[-1])[rows]
        t = t_hidden.reshape(-1, t_hidden.shape[-1])[rows]
        bank_keys, bank_ids = self.bank.contents() if self.bank is not None and "input_ids" in batch else (None, None)
        loss = token_contrastive_loss(s, t, ids, self.config.contrast_temperature, bank_keys, bank_ids)
        if self.bank is not None and "input_ids" in batch:
            self.bank.push(t, ids)
        return loss

    def callbacks(self) -> list:
        from lightmods.callbacks.quant import QuantTraining

        return [QuantTraining(self)] if self.needs_teacher else []

    def summary(self, model: nn.Module) -> dict:
        from lightmods.quant.export import compression_report

        heads = self.family.head_modules if self.family else ()
        return {**count_parameters(model, heads), **compression_report(model)}
