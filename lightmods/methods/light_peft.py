"""Light-PEFT (Gu et al., Findings of ACL 2024): early pruning of the foundation model and of the PEFT
modules, decided after a short estimation phase and applied physically, then training continues.

The estimation phase trains scalar gates on every attention unit and FFN neuron (L1-penalised) beside
LoRA or bottleneck adapters on all linear layers of each block, while recording each PEFT module's
importance ratio and each rank's first-order Taylor score. The :class:`EarlyPruning` callback then builds
one :class:`PruningPlan` and the structural core slices the model; see ``lightmods/callbacks/early_pruning.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lightmods.config import checks
from lightmods.methods.base import LossTerm, Method, MethodConfig, register_method
from lightmods.models.families import Family
from lightmods.peft import BottleneckAdapter, LoraLinear, inject_adapters, mark_trainable
from lightmods.structure import add_gates, get_gates
from lightmods.structure.spec import LAYOUTS

PEFT_KINDS = ("lora", "adapter", "none")
SCOPES = ("global", "layerwise")


@dataclass
class LightPeftConfig(MethodConfig):
    """Defaults follow the official scripts (estimate.sh / train.sh) unless noted."""

    name: str = "light_peft"
    lr: float = 3e-4
    peft: str = "lora"  # lora | adapter | none (= full fine-tuning with gates: the masks-only ablation)
    target_modules: list[str] | None = (
        None  # null = every block linear (LoRA), attention/FFN outputs (adapters)
    )
    rank: int = 8  # LoRA rank, or the adapter bottleneck size
    alpha: float = 16.0
    dropout: float = 0.05
    estimate_steps: int = 800
    l1_coef: float = 1e-4
    prune_foundation: bool = True
    prune_peft: bool = True
    head_prune_ratio: float = 1 / 3  # per layer
    neuron_prune_ratio: float = 1 / 3
    neuron_scope: str = "global"
    module_prune_ratio: float = 0.75  # keep the top 25% of PEFT modules
    rank_prune_ratio: float = 0.5  # over the ranks of the kept modules, globally
    random_scores: bool = False  # random-importance baseline
    inference_batches: int = 10  # validation batches timed before/after pruning (0 = skip)

    def __post_init__(self):
        super().__post_init__()
        checks.one_of("method.peft", self.peft, PEFT_KINDS)
        checks.one_of("method.neuron_scope", self.neuron_scope, SCOPES)
        checks.positive("method.rank", self.rank)
        checks.positive("method.alpha", self.alpha)
        checks.ratio("method.dropout", self.dropout)
        checks.non_negative("method.estimate_steps", self.estimate_steps)
        checks.non_negative("method.l1_coef", self.l1_coef)
        checks.non_negative("method.inference_batches", self.inference_batches)
        for key in ("head_prune_ratio", "neuron_prune_ratio", "module_prune_ratio", "rank_prune_ratio"):
            checks.ratio(f"method.{key}", getattr(self, key))


def block_linear_patterns(family: Family) -> list[str]:
    """Every linear layer of a transformer block, as name suffixes."""
    lay = LAYOUTS[family.name]
    return sorted({lay.query, lay.key, lay.value, lay.attn_out, *lay.ffn_in, lay.ffn_out})


@register_method
class LightPeft(Method):
    name = "light_peft"
    Config = LightPeftConfig

    def prepare(self, model: nn.Module, family: Family) -> nn.Module:
        c = self.config
        self.family = family
        self.injected: list[str] = []
        if c.peft != "none":
            if c.target_modules:
                targets = list(c.target_modules)
            elif c.peft == "lora":
                targets = block_linear_patterns(family)
            else:  # adapters read the hidden state: after the attention and FFN outputs, as the official runs
                targets = list(family.adapter_targets["houlsby"])
            if c.peft == "lora":
                factory = lambda lin: LoraLinear(lin, rank=c.rank, alpha=c.alpha, dropout=c.dropout)  # noqa: E731
            else:  # the official adapter runs: bottleneck = rank, ReLU, on every output.dense
                factory = lambda lin: BottleneckAdapter(lin, bottleneck_dim=c.rank, activation="relu")  # noqa: E731
            self.injected = inject_adapters(model, targets, factory, exclude=list(family.head_modules))
            mark_trainable(model, head_patterns=self.head_patterns())
        else:
            model.requires_grad_(True)
        if c.prune_foundation:
            add_gates(model)
        return model

    def loss_terms(self) -> list[LossTerm]:
        if not self.config.prune_foundation or self.config.l1_coef == 0:
            return []
        return [LossTerm("gates_l1", self.config.l1_coef, _gates_l1)]

    def callbacks(self) -> list:
        from lightmods.callbacks.early_pruning import EarlyPruning

        return [EarlyPruning(self.config)]


def _gates_l1(module, batch, logits) -> torch.Tensor:
    gates = get_gates(module.model)
    return gates.l1() if gates is not None else logits.new_zeros(())
