"""WID, Weight-Inherited Distillation (Wu et al., Findings of NAACL 2024): the student inherits the fine-tuned
teacher's weights through compactors and is distilled without any alignment loss.

- Every block linear layer (q/k/v, attention output, FFN input(s) and output) is wrapped in identity row and
  column compactors, ``R (W (C x) + b)`` (``lightmods/structure/compactors.py``); the model starts as the
  teacher exactly (its weights are copied from ``method.teacher``).
- Masks over the hidden dimension (one, shared by every layer), each layer's FFN neurons and its attention
  units (the official ``head`` strategy: whole heads) are recomputed every ``w_step`` optimizer steps from
  the compactors' column/row L2 norms; the number masked grows linearly over ``mask_rounds`` rounds to the
  target widths (``target_ratio`` of each width, or explicit ``target_hidden`` / ``target_ffn`` /
  ``target_units``). A channel once masked stays masked.
- The compactor entries of masked channels shrink to 0 while the others get their normal gradients; before the
  first mask every compactor gradient gets ``+ pre_mask_l2 * w``. ``shrink: gradient`` is the official rule:
  their gradient becomes the L2 penalty ``l2_lambda * w`` (with Adam: the gradient ``w`` and the rest injected
  into ``exp_avg``, so the first moment sees ``l2_lambda * w`` and the second ``w^2``). ``shrink: decoupled``
  (default) applies the same L2 shrinking outside Adam, as AdamW decouples weight decay: masked entries leave
  the optimizer and are multiplied by ``1 - rho`` every step, ``rho`` set so that the last round's entries keep
  1% of their norm at the merge. Masked hidden channels fade out of
  the residual stream and out of the norms' statistics with their compactors (a 0..1 gate per channel equal
  to the channel's compactor norm relative to its norm when it was masked, ``structure/hidden_gate.py``).
- The only loss is distillation from the teacher's logits (``hard_weight`` adds the labels).
- At ``merge_step`` (default: the last optimizer step) masked entries are set to 0, each layer is merged,
  ``W' = R W C``, ``b' = R b``, and the structural core slices the kept channels into a smaller dense model
  (``PruningPlan`` hidden / neurons / heads, saved in checkpoints and ``export/``); a run whose
  ``merge_step`` comes earlier fine-tunes the dense student for the rest. See ``lightmods/callbacks/wid.py``.

Why decoupled by default: Adam moves every compactor entry by about ``compactor_lr`` per step whatever the size
of its gradient, and the gradient of a square compactor is close to rank one, so one step changes a
``n x n`` compactor by about ``n * compactor_lr`` in spectral norm (0.15 for MiniLM's 1536-wide FFN
compactors at 1e-4): in a short fine-tuning run only a small ``compactor_lr`` (1e-5; official 5e-5 over 400k
pre-training steps) keeps the student the teacher's function, and at that rate the
official rule needs ``2 / (l2_lambda * compactor_lr)`` = 10,000 steps to shrink a masked entry. At 1e-3
(the first benchmark) MiniLM's student was at chance after 20 steps, before any channel was masked. With ``shrink: gradient`` the
derived schedule ends its mask rounds ``shrink_steps`` (default that estimate) before the merge; either way
the merge reports the norm it still cut (``masked_residual``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lightmods.config import checks
from lightmods.errors import config_error
from lightmods.methods.base import LossTerm, Method, MethodConfig, register_method
from lightmods.methods.teacher import TeacherCache, logit_kd
from lightmods.models.families import Family
from lightmods.structure.compactors import (
    CompactorMasks,
    add_compactors,
    channel_scores,
    compactors,
    hidden_scores,
    masked_entries,
    merge_compactors,
)
from lightmods.structure.spec import blocks

STATE = "wid_state"
SHRINK_MODES = ("decoupled", "gradient")
SHRINK_LEFT = 0.01  # decoupled shrinking: share of its norm a channel masked in the last round keeps at the merge


@dataclass
class WidConfig(MethodConfig):
    name: str = "wid"
    lr: float = 2e-5  # the inherited weights (official 1e-6 over 400k steps)
    compactor_lr: float = 1e-5  # the compactors (official 5e-5 over 400k steps; see the module docstring)
    teacher: str | None = None  # export/ of the fine-tuned model (required): weights inherited, logits distilled
    target_ratio: float = 0.5  # kept share of each width (hidden, FFN neurons, attention units)
    target_hidden: int | None = None  # explicit kept widths (override target_ratio for their kind)
    target_ffn: int | None = None
    target_units: int | None = None
    prune_hidden: bool = True
    prune_ffn: bool = True
    prune_units: bool = True
    w_step: int | None = None  # re-masking interval (official 500); null: derived from mask_end and shrink_steps
    mask_rounds: int = 16  # rounds to reach the target (official: 16 increments)
    mask_end: float = 0.5  # with w_step null: share of the steps before the merge by which the target is reached at the latest
    shrink: str = "decoupled"  # masked entries -> 0: decoupled (decay outside Adam, 1% left at the merge) | gradient (official L2 gradient rule)
    shrink_steps: int | None = None  # with w_step null: steps kept between the last round and the merge (null: 0 decoupled, 2 / (l2_lambda * compactor_lr) gradient)
    l2_lambda: float = 20.0  # shrink=gradient: the masked entries' L2 coefficient (official 20)
    adam_inject: bool = True  # shrink=gradient: the part of l2_lambda * w above w goes into Adam's exp_avg (official)
    pre_mask_l2: float = 1.0  # + pre_mask_l2 * w on every compactor gradient before the first mask (official: + w)
    merge_step: int | None = None  # null: the last optimizer step (official: after training)
    temperature: float = 1.0
    hard_weight: float = 0.0  # weight of the label loss beside the distillation (WID: none)
    inference_batches: int = 10  # validation batches timed before / after the merge (0 = skip)

    def __post_init__(self):
        super().__post_init__()
        checks.positive("method.compactor_lr", self.compactor_lr)
        if self.target_ratio is None or not 0 < self.target_ratio <= 1:
            raise config_error("method.target_ratio", self.target_ratio, "a number in (0, 1] (the kept share of each width)")
        for key in ("target_hidden", "target_ffn", "target_units", "w_step", "merge_step"):
            checks.positive(f"method.{key}", getattr(self, key), allow_none=True)
        checks.non_negative("method.shrink_steps", self.shrink_steps, allow_none=True)
        if self.shrink not in SHRINK_MODES:
            raise config_error("method.shrink", self.shrink, f"one of {', '.join(SHRINK_MODES)}")
        checks.positive("method.mask_rounds", self.mask_rounds)
        if self.mask_end is None or not 0 < self.mask_end <= 1:
            raise config_error("method.mask_end", self.mask_end, "a number in (0, 1]")
        if self.l2_lambda is None or self.l2_lambda < 1:
            raise config_error("method.l2_lambda", self.l2_lambda, "a number >= 1 (the masked entries' L2 coefficient)")
        checks.non_negative("method.pre_mask_l2", self.pre_mask_l2)
        checks.positive("method.temperature", self.temperature)
        checks.non_negative("method.hard_weight", self.hard_weight)
        checks.non_negative("method.inference_batches", self.inference_batches)
        if not (self.prune_hidden or self.prune_ffn or self.prune_units):
            raise config_error("method.prune_hidden", self.prune_hidden, "true when prune_ffn and prune_units are false (something to prune)")


    @property
    def shrink_window(self) -> int:
        """Steps kept between the last mask round and the merge. Decoupled shrinking fits its rate to whatever is
        left (0 needed); the gradient rule needs the time a masked entry takes to shrink from 1 to about 0: with
        the Adam injection it moves about ``l2_lambda * compactor_lr`` per step at first and slower as Adam's
        second moment lags behind, so twice the linear estimate."""
        if self.shrink_steps is not None:
            return self.shrink_steps
        return 0 if self.shrink == "decoupled" else math.ceil(2.0 / (self.l2_lambda * self.compactor_lr))


class WidState(nn.Module):
    """WID's masks as buffers of the model (saved and resumed with it): kept hidden channels, per layer kept
    FFN neurons and attention units, the number of mask rounds applied, each masked hidden channel's score
    when it was masked, and the hidden gate (not trained) whose hooks fade masked channels out."""

    def __init__(self, model: nn.Module, hidden: bool):
        super().__init__()
        full = CompactorMasks.full(model)
        self.register_buffer("hidden_mask", full.hidden.clone())
        self.register_buffer("neuron_masks", torch.stack(full.neurons))
        self.register_buffer("unit_masks", torch.stack(full.units))
        self.register_buffer("hidden_ref", torch.zeros(full.hidden.numel()))
        self.register_buffer("rounds", torch.zeros((), dtype=torch.long))
        self._handles: list = []
        self.gate = None
        if hidden:
            from lightmods.structure.hidden_gate import attach_hidden_gate, hidden_sites

            self.gate = nn.Parameter(torch.ones(full.hidden.numel()), requires_grad=False)
            self._handles = attach_hidden_gate(self.gate, hidden_sites(model))

    def masks(self) -> CompactorMasks:
        return CompactorMasks(self.hidden_mask.cpu().clone(), list(self.neuron_masks.cpu().clone()), list(self.unit_masks.cpu().clone()))

    @torch.no_grad()
    def set_masks(self, masks: CompactorMasks) -> None:
        self.hidden_mask.copy_(masks.hidden)
        self.neuron_masks.copy_(torch.stack(masks.neurons))
        self.unit_masks.copy_(torch.stack(masks.units))

    @torch.no_grad()
    def fade(self, model: nn.Module) -> None:
        """Gate of each masked hidden channel = its compactor norm now / when it was masked (clamped to [0, 1])."""
        if self.gate is None or bool(self.hidden_mask.all()):
            return
        masked = ~self.hidden_mask
        ratio = (hidden_scores(model).to(self.gate.device) / self.hidden_ref.clamp_min(1e-12)).clamp(0, 1)
        self.gate.copy_(torch.where(masked, ratio, torch.ones_like(ratio)))

    def detach_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def get_state(model: nn.Module) -> WidState | None:
    return getattr(model, STATE, None)


def kept_at_round(width: int, target: int, k: int, rounds: int) -> int:
    """Channels kept after round ``k`` of ``rounds``: the number removed grows linearly to ``width - target``."""
    return width - math.ceil(min(k, rounds) * (width - target) / rounds)


def keep_top(mask: torch.Tensor, scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep`` highest-scoring channels among those ``mask`` keeps (ties: lower index first)."""
    if int(mask.sum()) <= keep:
        return mask.clone()
    s = torch.where(mask, scores.float(), torch.full_like(scores.float(), -math.inf))
    out = torch.zeros_like(mask)
    out[torch.argsort(s, descending=True, stable=True)[:keep]] = True
    return out


@torch.no_grad()
def mask_round(model: nn.Module, targets: dict, k: int, rounds: int) -> CompactorMasks:
    """Apply round ``k``: the lowest-scoring kept channels of each pruned kind are masked down to that round's
    width (scores: :func:`channel_scores`); newly masked hidden channels remember their score."""
    state = get_state(model)
    scores = channel_scores(model)
    masks = state.masks()
    if targets["hidden"] is not None:
        new = keep_top(masks.hidden, scores["hidden"], kept_at_round(masks.hidden.numel(), targets["hidden"], k, rounds))
        newly = (masks.hidden & ~new).to(state.hidden_ref.device)
        state.hidden_ref[newly] = scores["hidden"].to(state.hidden_ref.device)[newly]
        masks.hidden = new
    for kind, key in (("neurons", "ffn"), ("units", "units")):
        if targets[key] is None:
            continue
        current = getattr(masks, kind)
        setattr(masks, kind, [keep_top(m, s, kept_at_round(m.numel(), targets[key], k, rounds)) for m, s in zip(current, scores[kind])])
    state.set_masks(masks)
    state.rounds.fill_(k)
    return masks


@torch.no_grad()
def shrink_masked_grads_(model: nn.Module, masks: CompactorMasks, lam: float, optimizer=None) -> int:
    """WID's rule for masked compactor entries: their gradient becomes the L2 penalty ``lam * w``. With an Adam
    ``optimizer`` whose state exists, the gradient becomes ``w`` and ``(1 - beta1) (lam - 1) w / beta1`` is added
    to ``exp_avg``, so after the step the first moment is ``beta1 m + (1 - beta1) lam w`` while the second
    moment sees ``w^2``: the entry moves about ``lam`` times the learning rate toward 0 per step. Returns the
    number of entries changed."""
    betas = {id(p): g.get("betas", (0.0, 0.0))[0] for g in (optimizer.param_groups if optimizer is not None else []) for p in g["params"]}
    changed = 0
    for p, m in masked_entries(model, masks):
        m = m.to(p.device)
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        w = p.detach()
        state = optimizer.state.get(p) if optimizer is not None else None
        exp_avg = state.get("exp_avg") if state else None
        beta1 = betas.get(id(p), 0.0)
        if exp_avg is not None and beta1 > 0:
            p.grad[m] = w[m]
            exp_avg[m] += (1 - beta1) * (lam - 1) / beta1 * w[m]
        else:
            p.grad[m] = lam * w[m]
        changed += int(m.sum())
    return changed


def decay_rate(steps: int) -> float:
    """Per-step decay ``rho`` that leaves ``SHRINK_LEFT`` of a norm after ``steps`` steps (1: zero at once)."""
    return 1.0 if steps < 1 else 1.0 - SHRINK_LEFT ** (1.0 / steps)


@torch.no_grad()
def decay_masked_(model: nn.Module, masks: CompactorMasks, rho: float, optimizer=None) -> int:
    """Decoupled shrinking: masked compactor entries are multiplied by ``1 - rho`` and taken out of this step of
    ``optimizer`` (gradient and Adam first moment 0, so Adam moves them by exactly 0). Returns the entries changed."""
    changed = 0
    for p, m in masked_entries(model, masks):
        m = m.to(p.device)
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad[m] = 0
        state = optimizer.state.get(p) if optimizer is not None else None
        if state and "exp_avg" in state:
            state["exp_avg"][m] = 0
        p[m] *= 1.0 - rho
        changed += int(m.sum())
    return changed


@torch.no_grad()
def masked_residual(model: nn.Module, masks: CompactorMasks) -> float:
    """Root mean square of the L2 norms of the masked compactor rows/columns: about 1 when they were masked
    (identity rows), 0 once the L2 rule has shrunk them; what the merge's zeroing still cuts off."""
    total, lines = 0.0, 0
    for p, m in masked_entries(model, masks):
        m = m.to(p.device)
        total += float(p.detach()[m].float().pow(2).sum())
        lines += int(m.all(dim=1).sum()) or int(m.all(dim=0).sum())
    return math.sqrt(total / lines) if lines else 0.0


@torch.no_grad()
def add_l2_grads_(model: nn.Module, coef: float) -> None:
    """``grad += coef * w`` on every compactor (WID before its first mask)."""
    for _, layer in compactors(model):
        for p in (layer.row, layer.col):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.add_(p.detach(), alpha=coef)


@register_method
class Wid(Method):
    name = "wid"
    Config = WidConfig

    def __init__(self, config: WidConfig):
        super().__init__(config)
        self.teacher: nn.Module | None = None  # set by the callback (frozen; not a submodule of the run)
        self._teacher_cache = TeacherCache()
        self.compactor_params: set[str] = set()
        self.targets: dict = {}

    def prepare(self, model: nn.Module, family: Family) -> nn.Module:
        c = self.config
        if not c.teacher:
            raise config_error("method.teacher", c.teacher, "an export/ folder of the fine-tuned model (WID's student inherits its weights and distils its logits)")
        self.family = family
        model.requires_grad_(True)
        names = add_compactors(model)
        self.compactor_params = {f"{n}.{s}" for n in names for s in ("row", "col")}
        self.targets = self.target_widths(model)
        model.add_module(STATE, WidState(model, hidden=self.targets["hidden"] is not None))
        return model

    def target_widths(self, model: nn.Module) -> dict:
        """Kept hidden channels, FFN neurons and attention units per layer (None: that kind is not pruned)."""
        c = self.config
        full = CompactorMasks.full(model)
        widths = {"hidden": full.hidden.numel(), "ffn": full.neurons[0].numel(), "units": full.units[0].numel()}
        out = {}
        for kind, on in (("hidden", c.prune_hidden), ("ffn", c.prune_ffn), ("units", c.prune_units)):
            explicit = getattr(c, f"target_{kind}")
            if explicit is not None and explicit > widths[kind]:
                raise config_error(f"method.target_{kind}", explicit, f"an integer in [1, {widths[kind]}] (the model's width)")
            target = explicit if explicit is not None else max(1, round(c.target_ratio * widths[kind]))
            out[kind] = target if on and target < widths[kind] else None
        return out

    def lr_of(self, param_name: str) -> float | None:
        return self.config.compactor_lr if param_name in self.compactor_params else None

    def decays(self, param_name: str) -> bool:
        """Compactors shrink by WID's own L2 rule on masked channels only; decay would shrink kept ones too."""
        return param_name not in self.compactor_params

    def task_weight(self, step: int) -> float:
        return self.config.hard_weight

    def loss_terms(self) -> list[LossTerm]:
        return [LossTerm("kd", 1.0, self._kd)]

    def _kd(self, module, batch: dict, logits: torch.Tensor) -> torch.Tensor:
        teacher_logits, _ = self._teacher_cache.get(self.teacher, batch, logits.device)
        return logit_kd(logits, teacher_logits, batch, self.config.temperature)

    def callbacks(self) -> list:
        from lightmods.callbacks.wid import WidTraining

        return [WidTraining(self.config, self)]

    def owns(self, state_name: str) -> bool:
        """Entries of the prepared model that are WID's own (not inherited from the teacher)."""
        return state_name.startswith(f"{STATE}.") or state_name in self.compactor_params

    def restructure(self, model: nn.Module, plan) -> nn.Module:
        """Merge every compactor into its layer (``W' = R W C``, ``b' = R b``), drop the masks and the gate's
        hooks, then slice ``plan``. The same at the merge, on resume and on export reload."""
        state = get_state(model)
        if state is not None:
            state.detach_hooks()
            delattr(model, STATE)
        merge_compactors(model)
        return super().restructure(model, plan)

    def summary(self, model: nn.Module) -> dict:
        out = super().summary(model)
        out["compactors"] = len(compactors(model))
        return out


def masked_share(model: nn.Module) -> dict:
    """Kept hidden channels and mean kept FFN neurons / attention units per layer (for logging)."""
    state = get_state(model)
    if state is None:
        return {}
    n = len(blocks(model))
    return {
        "hidden_kept": float(state.hidden_mask.sum()),
        "ffn_kept": float(state.neuron_masks.sum()) / n,
        "units_kept": float(state.unit_masks.sum()) / n,
    }
