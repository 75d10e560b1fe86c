"""PAT, Pruning-Aware Tuning (Liu et al., AAAI 2025): hidden-channel (residual-stream) pruning learned during
fine-tuning, for pre-norm RMSNorm decoders (LLaMA-style).

- Hybrid Sparsification Modules on every write into the residual stream (the token embedding, every attention
  output and FFN output projection, before the residual add): ``(x + W_up W_down x) * s * g``, with one
  globally shared trainable mask behind ``s`` and its schedule toward ``d_keep`` kept channels
  (``lightmods/structure/hsm.py``).
- Losses: the mask's budget/polarisation loss (``train/loss_mask``) and the Identity Loss on each HSM's
  ``W_down`` (``train/loss_identity``), both added unweighted as in the official code.
- LoRA beside them on every linear layer of each block (not the task head / ``lm_head``, not the HSMs).
- At the end (``merge_at=end``: the last optimizer step; ``schedule``: the mask horizon ``mask_steps``, after
  which LoRA keeps training on the compressed model) the HSMs are folded into the adjacent linear layers with
  the mask binarised, and the removed channels are sliced by the structural core with RMS-norm rescaling
  (``PruningPlan(hidden=kept, rescale_rms=True)``, stored in checkpoints and ``export/``); see
  ``lightmods/callbacks/pat.py``.

Post-LayerNorm encoders (BERT/RoBERTa) are refused: a channel zeroed before the residual add is not zero
after the LayerNorm that follows (and that LayerNorm's mean and variance run over every channel), so neither
PAT's training-time masking nor its merge carries over.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lightmods.config import checks
from lightmods.errors import ConfigError, config_error
from lightmods.methods.base import LossTerm, Method, MethodConfig, register_method
from lightmods.models.families import Family
from lightmods.peft import LoraLinear, inject_adapters, mark_trainable
from lightmods.structure.hsm import add_hsms, get_hsms, remove_hsms

MERGE_AT = ("end", "schedule")
PRE_NORM_FAMILIES = ("llama",)


@dataclass
class PatConfig(MethodConfig):
    """Defaults follow the official run (``llama2-7b-sft-lora-dimdown-learn3072.json``) unless noted."""

    name: str = "pat"
    lr: float = 5e-5  # official: 5e-5 for LoRA, HSMs and mask alike
    prune_ratio: float = 0.25  # share of hidden channels removed (official: 4096 -> 3072)
    hidden_keep: int | None = None  # kept hidden channels (official --dimdown_dim); overrides prune_ratio
    mask_steps: int = 10000  # the mask schedule's horizon G in optimizer steps (official --global_step)
    hsm_rank: int = 200  # the HSMs' low-rank width (official eff = 200 for LLaMA-7B)
    identity_weight: float = 1.0  # the Identity Loss (official: on, unweighted); 0 = off, and g stays 1
    mask_weight: float = 1.0  # the mask loss (official: unweighted)
    merge_at: str = "end"  # end: after the last optimizer step (official); schedule: at step mask_steps
    target_modules: list[str] | None = None  # LoRA targets; null = every linear layer of each block
    rank: int = 20  # official LoRA r=20, alpha=4 (scaling 0.2), dropout 0.05
    alpha: float = 4.0
    dropout: float = 0.05
    inference_batches: int = 10  # validation batches timed before / after the merge (0 = skip)

    def __post_init__(self):
        super().__post_init__()
        checks.one_of("method.merge_at", self.merge_at, MERGE_AT)
        checks.ratio("method.prune_ratio", self.prune_ratio)
        checks.positive("method.hidden_keep", self.hidden_keep, allow_none=True)
        if self.mask_steps is None or self.mask_steps < 2:
            raise config_error("method.mask_steps", self.mask_steps, "an integer >= 2 (ln G must be > 0)")
        checks.positive("method.hsm_rank", self.hsm_rank)
        checks.non_negative("method.identity_weight", self.identity_weight)
        checks.non_negative("method.mask_weight", self.mask_weight)
        checks.positive("method.rank", self.rank)
        checks.positive("method.alpha", self.alpha)
        checks.ratio("method.dropout", self.dropout)
        checks.non_negative("method.inference_batches", self.inference_batches)


def kept_target(config: PatConfig, width: int) -> int:
    """``d_keep``: ``hidden_keep``, or ``round(width * (1 - prune_ratio))`` (at least 1)."""
    if config.hidden_keep is not None:
        if not 0 < config.hidden_keep < width:
            raise config_error("method.hidden_keep", config.hidden_keep, f"an integer in [1, {width - 1}] (the model's hidden size is {width})")
        return int(config.hidden_keep)
    return max(1, round(width * (1 - config.prune_ratio)))


@register_method
class Pat(Method):
    name = "pat"
    Config = PatConfig

    def prepare(self, model: nn.Module, family: Family) -> nn.Module:
        from lightmods.methods.light_peft import block_linear_patterns

        c = self.config
        self.family = family
        if family.name not in PRE_NORM_FAMILIES:
            raise ConfigError(
                f"method=pat is not accepted with model_type={model.config.model_type!r} ({family.name} family); accepted: "
                "pre-norm RMSNorm decoders (model_type llama, mistral, qwen2, qwen3, e.g. model=tiny_llama). PAT zeroes hidden "
                "channels before the residual adds; a post-LayerNorm encoder renormalises them over all channels, so "
                "neither the masking nor the merge carries over"
            )
        width = model.config.hidden_size
        self.target = kept_target(c, width)
        targets = list(c.target_modules) if c.target_modules else block_linear_patterns(family)
        factory = lambda lin: LoraLinear(lin, rank=c.rank, alpha=c.alpha, dropout=c.dropout)  # noqa: E731
        self.injected = inject_adapters(model, targets, factory, exclude=list(family.head_modules))
        mark_trainable(model, head_patterns=self.head_patterns())
        hsm = add_hsms(model, c.hsm_rank, c.mask_steps, self.target)  # after LoRA: the hooks see its output
        hsm.requires_grad_(True)
        for site in hsm.sites.values():  # g trains with the identity loss only; mask-only sites have none
            site.scale.requires_grad_(bool(site.rank) and c.identity_weight > 0)
        return model

    def loss_terms(self) -> list[LossTerm]:
        from lightmods.losses.identity import identity_term
        from lightmods.losses.mask_budget import mask_budget_term

        terms = [mask_budget_term(self.config.mask_weight)]
        if self.config.identity_weight > 0:
            terms.append(identity_term(self.config.identity_weight))
        return terms

    def callbacks(self) -> list:
        from lightmods.callbacks.pat import PatMerge

        return [PatMerge(self.config)]

    def restructure(self, model: nn.Module, plan) -> nn.Module:
        """HSMs go first: mid-fit they are already folded in (``merge_hsms``); on resume and export reload the
        state dict holds the merged weights."""
        remove_hsms(model)
        return super().restructure(model, plan)

    def summary(self, model: nn.Module) -> dict:
        """Parameter accounting with the HSMs counted as adapters (trainable additions merged away at the end)."""
        out = super().summary(model)
        hsm = get_hsms(model)
        if hsm is not None:  # counted as backbone by the generic accounting: move them to the adapters
            roles = out["params_by_role"]
            for key, n in (
                ("total", sum(p.numel() for p in hsm.parameters())),
                ("trainable", sum(p.numel() for p in hsm.parameters() if p.requires_grad)),
            ):
                roles["backbone"][key] -= n
                roles["adapter"][key] += n
        out.update(
            adapted_modules=len(getattr(self, "injected", [])), hidden_target=getattr(self, "target", None),
            params_hsm=sum(p.numel() for p in hsm.parameters()) if hsm else 0,
        )  # fmt: skip
        return out


def deployed_parameters(summary: dict) -> int:
    """Parameters of the model as served: backbone + head (LoRA and HSMs merged into the weights)."""
    roles = summary["params_by_role"]
    return roles["backbone"]["total"] + roles["head"]["total"]

