"""Mask-based structured pruning of (generative) PLMs: SIMPLE (Tao et al., "Structured Pruning for Efficient
Generative Pre-trained Language Models", Findings of ACL 2023).

1. *Sparse training* (the first ``sparse_steps`` optimizer steps): learnable masks, initialised to 1, over
   every attention unit, every FFN neuron and the hidden dimension (one mask shared by all layers: the
   residual stream, embeddings and norms), trained with the weights under an L1 sparsity term whose weight
   rises linearly over ``l1_warmup_steps``; the objective is distillation from the unpruned fine-tuned
   ``teacher`` (its logits, soft cross-entropy) when one is given, the labels otherwise (``hard_weight``).
2. *Extraction*: one global threshold on ``|m|`` per requested size (``extract_sizes``: fractions of the
   model's parameters), found by bisection over the mask values; the surviving mask values are folded into
   the weights they scale (``fold_masks``; false: survivors count as 1) and the model is sliced physically by
   the structural core (``PruningPlan``: heads, neurons, hidden).
   Every size is exported to ``<run>/extracted/size_<s>/`` (plan + weights; ``load_export`` reloads it).
3. *Fine-tuning* of the ``finetune_size`` model for the rest of the run, with the masks fixed (gone):
   logit distillation plus hidden-state ("local") distillation of every block output on the kept channels
   (``rep_weight``), or the labels alone without a teacher.

The gates, the L1 term and the slicing are the shared ones (``structure/gates.py``, ``structure/hidden_gate.py``,
``losses/mask_l1.py``, ``structure/plan.py``); the stages are the :class:`MaskPruning` callback.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lightmods.config import checks
from lightmods.errors import config_error
from lightmods.losses.distill import hidden_mse
from lightmods.losses.mask_l1 import mask_l1_term
from lightmods.methods.base import LossTerm, Method, MethodConfig, register_method
from lightmods.methods.teacher import TeacherCache, logit_kd
from lightmods.models.families import Family
from lightmods.structure import add_gates


@dataclass
class MaskPruneConfig(MethodConfig):
    name: str = "mask_prune"
    lr: float = 5e-5  # the weights' learning rate (full fine-tuning)
    mask_lr: float | None = 1e-2  # the masks' learning rate (null: ``lr``)
    sparse_steps: int = 500  # optimizer steps of sparse training before extraction
    l1_coef: float = 1e-3
    l1_warmup_steps: int = 0  # the L1 weight rises linearly over these steps
    prune_heads: bool = True
    prune_neurons: bool = True
    prune_hidden: bool = True
    extract_sizes: list[float] = field(default_factory=lambda: [0.75, 0.5])  # fractions of the parameters kept
    finetune_size: float | None = None  # the extracted size trained on (null: the smallest)
    threshold_scope: str = "global"  # global: one threshold on all masks | per_kind: one per kind, equal shares
    teacher: str | None = None  # export/ of the fine-tuned unpruned model (same architecture); null: labels
    init_from_teacher: bool = True  # start from the teacher's weights (pruning the fine-tuned model)
    fold_masks: bool = True  # multiply the surviving mask values into the weights at extraction (false: they become 1)
    temperature: float = 1.0
    kd_weight: float = 1.0  # logit distillation (with a teacher)
    rep_weight: float = 1.0  # hidden-state distillation during fine-tuning (with a teacher)
    hard_weight: float = 0.0  # the label loss's weight with a teacher (1 without one)
    inference_batches: int = 10  # validation batches timed before/after extraction (0 = skip)

    def __post_init__(self):
        super().__post_init__()
        checks.positive("method.mask_lr", self.mask_lr, allow_none=True)
        checks.positive("method.sparse_steps", self.sparse_steps)
        checks.non_negative("method.l1_coef", self.l1_coef)
        checks.non_negative("method.l1_warmup_steps", self.l1_warmup_steps)
        checks.positive("method.temperature", self.temperature)
        for key in ("kd_weight", "rep_weight", "hard_weight"):
            checks.non_negative(f"method.{key}", getattr(self, key))
        checks.non_negative("method.inference_batches", self.inference_batches)
        checks.one_of("method.threshold_scope", self.threshold_scope, ("global", "per_kind"))
        if not (self.prune_heads or self.prune_neurons or self.prune_hidden):
            raise config_error("method.prune_hidden", self.prune_hidden, "true when prune_heads and prune_neurons are false (something to prune)")
        sizes = list(self.extract_sizes or [])
        if not sizes or any(not isinstance(s, (int, float)) or not 0 < s <= 1 for s in sizes) or len(set(sizes)) != len(sizes):
            raise config_error("method.extract_sizes", self.extract_sizes, "a non-empty list of distinct fractions in (0, 1]")
        if self.finetune_size is not None and self.finetune_size not in sizes:
            raise config_error("method.finetune_size", self.finetune_size, f"null or one of extract_sizes {sizes}")

    @property
    def train_size(self) -> float:
        return self.finetune_size if self.finetune_size is not None else min(self.extract_sizes)


@register_method
class MaskPrune(Method):
    name = "mask_prune"
    Config = MaskPruneConfig

    def __init__(self, config: MaskPruneConfig):
        super().__init__(config)
        self.teacher: nn.Module | None = None  # set by the callback (frozen; not a submodule of the run)
        self.student_hidden: list[torch.Tensor] = []  # block outputs of the last training forward
        self._teacher_cache = TeacherCache()

    def prepare(self, model: nn.Module, family: Family) -> nn.Module:
        c = self.config
        self.family = family
        model.requires_grad_(True)
        add_gates(model, heads=c.prune_heads, neurons=c.prune_neurons, hidden=c.prune_hidden)
        return model

    def lr_of(self, param_name: str) -> float | None:
        return self.config.mask_lr if "structure_gates." in param_name else None

    def restructure(self, model: nn.Module, plan) -> nn.Module:
        """Fold the surviving mask values into the weights (``fold_masks``), then drop the gates and slice. On
        resume and export reload the gates are fresh ones (all 1), so the fold changes nothing there."""
        from lightmods.structure import get_gates
        from lightmods.structure.gates import fold_gates

        gates = get_gates(model)
        if gates is not None and self.config.fold_masks:
            fold_gates(model, gates)
        return super().restructure(model, plan)

    def task_weight(self, step: int) -> float:
        return self.config.hard_weight if self.config.teacher else 1.0

    def loss_terms(self) -> list[LossTerm]:
        c = self.config
        terms = []
        if c.l1_coef > 0:
            terms.append(mask_l1_term(c.l1_coef, 0, c.l1_warmup_steps, c.sparse_steps))
        if c.teacher and c.kd_weight > 0:
            terms.append(LossTerm("kd", c.kd_weight, self._kd))
        if c.teacher and c.rep_weight > 0:
            terms.append(LossTerm("rep", c.rep_weight, self._rep))
        return terms

    def callbacks(self) -> list:
        from lightmods.callbacks.mask_prune import MaskPruning

        return [MaskPruning(self.config, self)]

    # ---- distillation (the shared teacher code: ``lightmods/methods/teacher.py``) ------------------------
    def teacher_outputs(self, batch: dict, device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The teacher's logits and block outputs for ``batch`` (one forward per batch, cached)."""
        return self._teacher_cache.get(self.teacher, batch, device)

    def _kd(self, module, batch: dict, logits: torch.Tensor) -> torch.Tensor:
        teacher_logits, _ = self.teacher_outputs(batch, logits.device)
        return logit_kd(logits, teacher_logits, batch, self.config.temperature)

    def _rep(self, module, batch: dict, logits: torch.Tensor) -> torch.Tensor:
        """Hidden-state distillation of every block output on the kept hidden channels (fine-tuning only)."""
        if module.plan is None or not self.student_hidden:
            return logits.new_zeros(())
        _, teacher_hidden = self.teacher_outputs(batch, logits.device)
        kept = getattr(module.plan, "hidden", None)
        mask = batch.get("attention_mask")
        terms = []
        for s, t in zip(self.student_hidden, teacher_hidden):
            if kept is not None:
                t = t.index_select(-1, torch.as_tensor(kept, device=t.device))
            terms.append(hidden_mse(s, t, mask))
        return torch.stack(terms).sum()


def capture_block_outputs(model: nn.Module, sink) -> list:
    """Forward hooks that append each block's output hidden states to ``sink()`` (a list) in training or
    when ``sink`` asks for it; returns the handles."""
    from lightmods.structure import blocks

    def hook(module, args, out):
        target = sink(module)
        if target is not None:
            target.append(out[0] if isinstance(out, tuple) else out)

    return [b.module.register_forward_hook(hook) for b in blocks(model)]
