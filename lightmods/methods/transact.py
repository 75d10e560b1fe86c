"""TransAct (Shen et al., Findings of ACL 2024, "Pruning LLMs to Intra-module Low-rank Architecture with
Transitional Activations"): structured pruning of the *intra-module* widths only, the attention inner width
(whole heads; key/value groups in grouped-query models) and the FFN intermediate width, keeping the hidden
size. Pruning the attention units shrinks the KV cache too.

Each of ``shots`` iterative shots starts by scoring every attention unit and FFN neuron by the L2 norm of its
transitional activations over ``calibration_samples`` training rows (no gradients, dropout off; see
:class:`lightmods.structure.importance.TransitionalActs`), keeps the top ones in every layer (one size for all
layers) at the interpolated size ``next = cur - (cur - target) // (K - i + 1)`` (so shot K reaches the target),
slices the model physically through the structural core, and trains. Shot ``i`` trains
``P * (1/2 + (i-1)/(K-1))`` optimizer steps (the official token budget per shot, growing), ``P`` =
``shot_steps`` or ``prune_frac * total_steps / K``; the rest of the run is the continued training that follows
the last shot. With ``lr_schedule=shots`` each shot has its own warm-up + cosine schedule peaking at
``lr * 2i/K`` and the continued training one peaking at ``lr`` (the official ``run_trainer.sh``). Training is
full fine-tuning as in the paper, or LoRA beside the frozen backbone (``train=lora``). See
``lightmods/callbacks/transact.py`` for the shots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from lightmods.config import checks
from lightmods.errors import ConfigError, config_error
from lightmods.methods.base import Method, MethodConfig, register_method
from lightmods.models.families import Family
from lightmods.peft import LoraLinear, inject_adapters, mark_trainable
from lightmods.structure import blocks, layout_of

TRAIN_KINDS = ("full", "lora")
GROWTH = ("increasing", "uniform")
LR_SCHEDULES = ("shots", "run")


@dataclass
class TransActConfig(MethodConfig):
    """Defaults follow the official ``run_trainer.sh`` unless noted."""

    name: str = "transact"
    lr: float = 5e-5  # official: 5e-5 (shot i at 5e-5 * 2i/K, continued training at 5e-5)
    train: str = "full"  # full (official: full-parameter training) | lora (LoRA beside the frozen backbone)
    target_modules: list[str] | None = None  # LoRA targets; null = every linear layer of each block
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    # targets, as fractions of the original widths kept (official -a 2048 / 4096 heads, -f 3072 / 11008)
    target_attn_ratio: float = 0.5
    target_ffn_ratio: float = 0.28
    target_attn_dim: int | None = None  # attention inner width (heads x head_dim) kept; overrides the ratio
    target_ffn_dim: int | None = None  # FFN intermediate width kept; overrides the ratio
    shots: int = 8  # official prune_shots
    shot_steps: int | None = None  # mean optimizer steps per shot; null = prune_frac * run steps / shots
    prune_frac: float = 0.5  # share of the run's steps the shots take when shot_steps is null (see README)
    shot_growth: str = "increasing"  # increasing: shot i trains P (1/2 + (i-1)/(K-1)) steps (official); uniform: P
    lr_schedule: str = "shots"  # shots: per-shot warm-up + cosine at lr * 2i/K (official); run: the run's optim.*
    shot_warmup: float = 0.1  # warm-up share of each shot / of the continued training (official warmup_ratio)
    calibration_samples: int = 128  # training rows scored per shot (official -n 128 sequences)
    inference_batches: int = 10  # validation batches timed before the first / after the last shot (0 = skip)

    def __post_init__(self):
        super().__post_init__()
        checks.one_of("method.train", self.train, TRAIN_KINDS)
        checks.one_of("method.shot_growth", self.shot_growth, GROWTH)
        checks.one_of("method.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        checks.positive("method.rank", self.rank)
        checks.positive("method.alpha", self.alpha)
        checks.ratio("method.dropout", self.dropout)
        for key in ("target_attn_ratio", "target_ffn_ratio", "prune_frac"):
            value = getattr(self, key)
            if value is None or not 0 < value <= 1:
                raise config_error(f"method.{key}", value, "a number in (0, 1]")
        checks.positive("method.target_attn_dim", self.target_attn_dim, allow_none=True)
        checks.positive("method.target_ffn_dim", self.target_ffn_dim, allow_none=True)
        checks.positive("method.shots", self.shots)
        checks.positive("method.shot_steps", self.shot_steps, allow_none=True)
        checks.ratio("method.shot_warmup", self.shot_warmup)
        checks.positive("method.calibration_samples", self.calibration_samples)
        checks.non_negative("method.inference_batches", self.inference_batches)


def shot_size(current: int, target: int, shot: int, shots: int) -> int:
    """Size after shot ``shot`` (1-based) of ``shots``: the official ``cur - (cur - target) // (K - i + 1)``;
    monotone, and exactly ``target`` at the last shot."""
    return current - (current - target) // (shots - shot + 1)


@dataclass(frozen=True)
class ShotSchedule:
    """Optimizer steps at which each shot prunes (``starts[0] = 0``) and where the shots end (``end``); the
    continued training runs from ``end`` to ``total``."""

    starts: tuple[int, ...]
    end: int
    total: int

    def stage_at(self, step: int) -> tuple[int, int, float]:
        """(first step, length, learning-rate scale) of the stage holding ``step``: shot i at ``2i/K``, the
        continued training at 1."""
        k = len(self.starts)
        bounds = (*self.starts, self.end)
        for i in range(k):
            if bounds[i] <= step < bounds[i + 1]:
                return bounds[i], bounds[i + 1] - bounds[i], 2.0 * (i + 1) / k
        return self.end, max(1, self.total - self.end), 1.0


def shot_schedule(total: int, shots: int, mean_steps: float, growth: str = "increasing") -> ShotSchedule:
    """Shot ``i`` (1-based) trains ``P * (1/2 + (i-1)/(K-1))`` steps (``growth=increasing``; official: tokens
    ``P/2 + P(i-1)/(K-1)``, summing to ``K P``) or ``P`` (``uniform``); boundaries are rounded cumulative sums."""
    lengths = [
        mean_steps * (0.5 + (i - 1) / (shots - 1)) if growth == "increasing" and shots > 1 else mean_steps
        for i in range(1, shots + 1)
    ]
    bounds = [round(sum(lengths[:i])) for i in range(shots + 1)]
    return ShotSchedule(tuple(bounds[:-1]), bounds[-1], int(total))


@register_method
class TransAct(Method):
    name = "transact"
    Config = TransActConfig

    def prepare(self, model: nn.Module, family: Family) -> nn.Module:
        c = self.config
        self.family = family
        try:
            layout_of(model)
        except ConfigError as e:
            raise config_error("method", "transact", f"a model with a block layout (bert, roberta, llama families): {e}") from None
        first = blocks(model)[0]
        unit_width = first.head_dim * first.group
        self.full = {"units": first.num_units, "neurons": first.num_neurons, "unit_width": unit_width}
        self.targets = {"units": self._target_units(first), "neurons": self._target_neurons(first)}
        if c.train == "full":
            model.requires_grad_(True)
        else:
            from lightmods.methods.light_peft import block_linear_patterns

            targets = list(c.target_modules) if c.target_modules else block_linear_patterns(family)
            factory = lambda lin: LoraLinear(lin, rank=c.rank, alpha=c.alpha, dropout=c.dropout)  # noqa: E731
            self.injected = inject_adapters(model, targets, factory, exclude=list(family.head_modules))
            if not self.injected:
                raise config_error("method.target_modules", c.target_modules, "patterns matching linear layers of the model")
            mark_trainable(model, head_patterns=self.head_patterns())
        return model

    def _target_units(self, block) -> int:
        c, width, units = self.config, block.head_dim * block.group, block.num_units
        if c.target_attn_dim is None:
            return max(1, math.ceil(c.target_attn_ratio * units - 1e-9))
        if c.target_attn_dim > units * width:
            raise config_error("method.target_attn_dim", c.target_attn_dim, f"a width <= the attention width {units * width}")
        return max(1, math.ceil(c.target_attn_dim / width))  # whole units (official: ceil(dim / head_dim) heads)

    def _target_neurons(self, block) -> int:
        c, n = self.config, block.num_neurons
        if c.target_ffn_dim is None:
            return max(1, math.ceil(c.target_ffn_ratio * n - 1e-9))
        if c.target_ffn_dim > n:
            raise config_error("method.target_ffn_dim", c.target_ffn_dim, f"a width <= the FFN width {n}")
        return c.target_ffn_dim

    def schedule(self, total: int) -> ShotSchedule:
        """The shot boundaries for a run of ``total`` optimizer steps; every shot must start before the end."""
        c = self.config
        mean = c.shot_steps if c.shot_steps is not None else c.prune_frac * total / c.shots
        sched = shot_schedule(total, c.shots, mean, c.shot_growth)
        if sched.starts[-1] >= total:
            raise config_error(
                "method.shot_steps", c.shot_steps,
                f"shots that start within the run's {total} optimizer steps (the last would start at step {sched.starts[-1]})",
            )  # fmt: skip
        return sched

    def lr_lambda(self, total: int):
        if self.config.lr_schedule == "run":
            return None
        sched, warm = self.schedule(total), self.config.shot_warmup

        def factor(step: int) -> float:
            start, length, scale = sched.stage_at(step)
            k, w = step - start, int(warm * length)
            if k < w:
                return scale * (k + 1) / w
            return scale * 0.5 * (1 + math.cos(math.pi * min(1.0, (k - w) / max(1, length - w))))

        return factor

    def callbacks(self) -> list:
        from lightmods.callbacks.transact import TransActShots

        return [TransActShots(self)]

    def summary(self, model: nn.Module) -> dict:
        out = super().summary(model)
        if self.config.train == "lora":
            out["adapted_modules"] = len(self.injected)
        return out
