"""COST-EFF (Shen et al., EMNLP 2022): a slenderized multi-exit model, trained by calibrated distillation.

One run goes through the official pipeline's stages (fractions of the run's optimizer steps):

1. ``ta_rep`` / ``ta_pred``: the teaching assistant (TA). The full-width multi-exit student, initialised from
   the pretrained backbone, learns from the fine-tuned ``teacher`` (an ``export/`` folder): first its hidden
   states alone, then ``1/2 [softCE(z^L, t) + sum_k softCE(z^k, t) + sum_k CE(z^k, y) + CE(z^L, y)]`` (every
   exit imitates the teacher's final prediction).
2. ``prune``: the TA, frozen, becomes the teacher. The student is slenderized in ``prune_events`` steps, at the
   end of equal periods: heads, FFN neurons and the embedding rank go linearly from their full sizes to the
   targets (the official schedule drops one head per layer per event; ``prune_schedule=geometric`` removes
   the same share at every event instead), scored by Taylor importance of the
   loss over all exits (``|sum |grad| * W|``), sliced physically through the structural core. In each period
   the first ``repr_proportion`` of the steps distil hidden states alone, the rest hidden states and every
   exit's prediction from the TA's corresponding exit. The learning rate restarts each period at
   ``prune_lr_scale * (1 + lr_restore)^p`` with its own warm-up and linear decay.
3. ``recover_rep`` / ``recover_pred``: distillation from the TA (hidden states; then predictions + hidden), at
   ``recover_lr_scale`` times the learning rate.

Exits: an exit after every layer from ``exits.start`` (the ``exits`` group's keys), trained with gradient
equilibrium; the final classifier reads ``tanh(CLS)`` as the official head (``pooler_dense=false``). With
``teacher: null`` the TA learns from the labels alone and still teaches the later stages.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from lightmods.config import checks
from lightmods.errors import config_error
from lightmods.exits.heads import check_exit_model, get_exits
from lightmods.losses.distill import hidden_states_mse, soft_cross_entropy
from lightmods.losses.labelled import labelled_cross_entropy
from lightmods.methods.base import LossTerm, Method, MethodConfig, register_method
from lightmods.models.families import Family
from lightmods.peft import count_parameters
from lightmods.structure import blocks

log = logging.getLogger("lightmods")

STAGES = ("ta_rep", "ta_pred", "prune", "recover_rep", "recover_pred")
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
TA_INITS = ("pretrained", "teacher")
PRUNE_SCHEDULES = ("linear", "geometric")
EMB_SVD_WEIGHTS = ("none", "token_frequency")
SELECTIONS = ("last", "exits_mean")
EMB_VOCABS = ("all", "train")
EMB_FALLBACKS = ("unk", "nearest")


@dataclass
class CostEffConfig(MethodConfig):
    name: str = "cost_eff"
    lr: float = 3e-5
    teacher: str | None = None  # export/ of a fine-tuned model of the same depth and width (method=full_ft)
    # what the TA starts from: the pretrained backbone (official) or the fine-tuned teacher's weights (every
    # backbone and classifier weight; exits keep their initialisation), which spares the TA relearning the task
    ta_init: str = "pretrained"
    temperature: float = 1.0
    pooler_dense: bool = False  # keep BERT's dense pooler before the final classifier (official: no)
    hard_weight: float = (
        1.0  # multiplies the label cross-entropies (TA stage, or every stage without a teacher)
    )
    pred_weight: float = 1.0  # multiplies the prediction distillation (softCE) terms
    rep_weight: float = 1.0  # multiplies the hidden-state distillation
    # stages, as fractions of the run's optimizer steps; recover_pred takes the rest
    ta_rep_frac: float = 0.05
    ta_pred_frac: float = 0.25
    prune_frac: float = 0.3
    recover_rep_frac: float = 0.1
    repr_proportion: float = 0.7  # of each prune period: hidden-state distillation alone
    stage_warmup: float = 0.1  # warm-up share of each stage / prune period
    prune_lr_scale: float = 0.5  # official: 1e-5 while pruning vs 2e-5 for the TA
    lr_restore: float = 0.12  # lr x (1 + lr_restore)^p after prune event p
    # lr of the recovery stages (recover_rep, recover_pred) relative to ``lr``: a slender model fitting the TA
    # on a small training split can overfit at the learning rate that suits the TA stage
    recover_lr_scale: float = 1.0
    # slenderization targets per layer (null: keep that part)
    target_heads: int | None = None  # attention heads (key/value units)
    target_ffn: int | None = None  # FFN neurons
    target_emb_rank: int | None = None  # rank of the factorised word embedding
    prune_events: int | None = None  # null: one head per event (heads - target_heads), or 1
    # sizes between events: linear (official: the same number of units removed each time) or geometric (the
    # same share of what is left removed each time, so the last events cut less deep)
    prune_schedule: str = "linear"
    # the embedding's SVD: plain (official) or weighted by how often each token occurs in the training split, so
    # the rank is spent on the tokens the task reads (lightmods/structure/embedding.py)
    emb_svd_weights: str = "none"
    # the word embedding's rows: all of them (official), or (train) only those of the tokens the training split
    # uses plus the special tokens, the others reading [UNK]'s row, from the first prune event on
    emb_vocab: str = "all"
    # with emb_vocab=train, the row a dropped token id reads: [UNK]'s, or that of the kept token nearest to it
    # (cosine) in the word embedding at the moment of trimming
    emb_fallback: str = "unk"
    # with emb_vocab=train, how often a token must occur in the training split to keep its row (1: every token it
    # uses); rarer tokens read the fallback row too, and the rows saved go to a higher rank at the same parameters
    emb_min_count: int = 1
    taylor_batches: int | None = 32  # training batches per importance estimate (null: one pass)
    # the weights the run ends with: the last step's, or (official) those of the validation after the prune
    # stage with the best accuracy averaged over all exits (selected on the validation split it reports)
    select: str = "last"

    def __post_init__(self):
        super().__post_init__()
        checks.positive("method.temperature", self.temperature)
        checks.one_of("method.ta_init", self.ta_init, TA_INITS)
        checks.one_of("method.prune_schedule", self.prune_schedule, PRUNE_SCHEDULES)
        checks.one_of("method.emb_svd_weights", self.emb_svd_weights, EMB_SVD_WEIGHTS)
        checks.one_of("method.select", self.select, SELECTIONS)
        checks.one_of("method.emb_vocab", self.emb_vocab, EMB_VOCABS)
        checks.one_of("method.emb_fallback", self.emb_fallback, EMB_FALLBACKS)
        checks.positive("method.emb_min_count", self.emb_min_count)
        for key, default in (("emb_fallback", "unk"), ("emb_min_count", 1)):  # settings of what is dropped
            if self.emb_vocab == "all" and getattr(self, key) != default:
                raise config_error(
                    f"method.{key}", getattr(self, key), f"{default!r} when method.emb_vocab is 'all' (nothing is dropped)"
                )
        if self.ta_init == "teacher" and not self.teacher:
            raise config_error("method.ta_init", self.ta_init, "'pretrained' when method.teacher is null")
        for key in ("hard_weight", "pred_weight", "rep_weight", "lr_restore"):
            checks.non_negative(f"method.{key}", getattr(self, key))
        checks.positive("method.prune_lr_scale", self.prune_lr_scale)
        checks.positive("method.recover_lr_scale", self.recover_lr_scale)
        for key in (
            "ta_rep_frac",
            "ta_pred_frac",
            "prune_frac",
            "recover_rep_frac",
            "repr_proportion",
            "stage_warmup",
        ):
            checks.ratio(f"method.{key}", getattr(self, key), closed_right=True)
        used = self.ta_rep_frac + self.ta_pred_frac + self.prune_frac + self.recover_rep_frac
        if used > 1 + 1e-9:
            raise config_error(
                "method.prune_frac", self.prune_frac, f"stage fractions summing to at most 1 (now {used:.3f})"
            )
        for key in ("target_heads", "target_ffn", "target_emb_rank", "prune_events", "taylor_batches"):
            checks.positive(f"method.{key}", getattr(self, key), allow_none=True)

    @property
    def slenderizes(self) -> bool:
        return self.emb_vocab != "all" or any(
            v is not None for v in (self.target_heads, self.target_ffn, self.target_emb_rank)
        )


@dataclass
class Stages:
    """Stage boundaries (optimizer steps) of one run and the prune events (a prune fires once ``global_step``
    reaches its step, i.e. after that many optimizer steps)."""

    total: int
    bounds: dict[str, tuple[int, int]]
    events: list[int]

    @classmethod
    def build(cls, c: CostEffConfig, total: int, n_events: int) -> Stages:
        fracs = [c.ta_rep_frac, c.ta_pred_frac, c.prune_frac, c.recover_rep_frac]
        edges, acc = [0], 0.0
        for f in fracs:
            acc += f
            edges.append(min(total, round(acc * total)))
        edges.append(total)
        bounds = {s: (edges[i], edges[i + 1]) for i, s in enumerate(STAGES)}
        start, end = bounds["prune"]
        events = (
            [start + round(p * (end - start) / n_events) for p in range(1, n_events + 1)] if n_events else []
        )
        return cls(total, bounds, events)

    def stage(self, step: int) -> str:
        for s in STAGES:
            lo, hi = self.bounds[s]
            if lo <= step < hi:
                return s
        return "recover_pred"

    @property
    def ta_end(self) -> int:
        return self.bounds["ta_pred"][1]

    def period(self, step: int) -> tuple[int, int, int]:
        """Within the prune stage: (period index = events before ``step``, period start, period end)."""
        lo, hi = self.bounds["prune"]
        edges = [lo, *self.events]
        if edges[-1] < hi:  # no events (nothing to slenderize): one period
            edges.append(hi)
        if len(edges) == 1:
            return 0, lo, hi
        for p in range(len(edges) - 1):
            if step < edges[p + 1]:
                return p, edges[p], edges[p + 1]
        return len(edges) - 2, edges[-2], edges[-1]

    def segments(self, c: CostEffConfig) -> list[tuple[int, int, float]]:
        """(start, end, lr scale) of every schedule segment: each stage, and each prune period."""
        out = []
        for s in STAGES:
            lo, hi = self.bounds[s]
            if s == "prune":
                edges = [lo, *self.events]
                for p in range(len(edges) - 1):
                    out.append((edges[p], edges[p + 1], c.prune_lr_scale * (1 + c.lr_restore) ** p))
                lo = edges[-1]  # steps after the last event (none when events end the stage)
            out.append((lo, hi, c.recover_lr_scale if s.startswith("recover") else 1.0))
        return [seg for seg in out if seg[1] > seg[0]]


def segment_lr(segments: list[tuple[int, int, float]], warmup: float):
    """The schedule as an ``LambdaLR`` factor: each segment warms up linearly over ``warmup`` of its steps
    then decays linearly towards 0 at its end."""

    def factor(step: int) -> float:
        for lo, hi, scale in segments:
            if lo <= step < hi:
                n, t = hi - lo, step - lo
                w = min(max(1, round(warmup * n)), max(1, n // 2))
                if t < w:
                    return scale * (t + 1) / w
                return scale * (n - t) / max(1, n - w)
        return 0.0 if segments else 1.0  # past the last step

    return factor


@register_method
class CostEff(Method):
    name = "cost_eff"
    Config = CostEffConfig
    uses_exits = True  # the run attaches exit heads from the ``exits`` group whatever its name

    def __init__(self, config: CostEffConfig):
        super().__init__(config)
        self.teacher: nn.Module | None = None  # the current teacher (fine-tuned model, then the TA)
        self.original_teacher: nn.Module | None = None
        self._stages: Stages | None = None
        self.params_original: int | None = None

    def prepare(self, model: nn.Module, family: Family) -> nn.Module:
        check_exit_model(model)
        self.family = family
        self.params_original = count_parameters(model, family.head_modules)["params_total"]
        pooler = getattr(model.base_model, "pooler", None)
        if (
            not self.config.pooler_dense
            and pooler is not None
            and isinstance(getattr(pooler, "dense", None), nn.Linear)
        ):
            pooler.dense = nn.Identity()  # the final exit reads tanh(CLS), as the official classifier
        model.requires_grad_(True)
        b = blocks(model)[0]
        self.full_sizes = {"heads": b.num_units, "ffn": b.num_neurons, "hidden": model.config.hidden_size}
        c = self.config
        for key, full in (
            ("target_heads", b.num_units),
            ("target_ffn", b.num_neurons),
            ("target_emb_rank", model.config.hidden_size),
        ):
            value = getattr(c, key)
            if (
                value is not None and value > full
            ):  # e.g. an experiment's MiniLM targets on the tiny test model
                log.warning("method.%s=%d exceeds this model's %d: kept at %d", key, value, full, full)
                setattr(c, key, full)
        return model

    # ---- schedule ---------------------------------------------------------------------------------------
    def n_events(self) -> int:
        c = self.config
        if not c.slenderizes or c.prune_frac == 0:
            return 0
        if c.prune_events is not None:
            return c.prune_events
        if c.target_heads is not None and c.target_heads < self.full_sizes["heads"]:
            return self.full_sizes["heads"] - c.target_heads
        return 1

    def stages_for(self, total: int) -> Stages:
        if self._stages is None or self._stages.total != total:
            self._stages = Stages.build(self.config, total, self.n_events())
        return self._stages

    def lr_lambda(self, total: int):
        stages = self.stages_for(total)
        return segment_lr(stages.segments(self.config), self.config.stage_warmup)

    # ---- objective --------------------------------------------------------------------------------------
    def _mode(self, step: int) -> str:
        """What the loss is at ``step``: ``hard`` (labels), ``ta`` (stage 2b), ``rep`` or ``pred_rep``."""
        stages = self._stages
        if self.teacher is None or stages is None:
            return "hard"
        stage = stages.stage(step)
        if stage in ("ta_rep", "recover_rep"):
            return "rep"
        if stage == "ta_pred":
            return "ta"
        if stage == "prune":
            _, lo, hi = stages.period(step)
            return "rep" if step - lo < self.config.repr_proportion * (hi - lo) else "pred_rep"
        return "pred_rep"

    def task_weight(self, step: int) -> float:
        mode = self._mode(step)
        return {"hard": 1.0, "ta": 0.5}.get(mode, 0.0) * self.config.hard_weight

    def loss_terms(self) -> list[LossTerm]:
        return [LossTerm("cost_eff", 1.0, self._objective)]

    @torch.no_grad()
    def teacher_outputs(self, batch: dict) -> tuple[dict[int, torch.Tensor], list[torch.Tensor]]:
        """The teacher's logits per exit (its final logits for every exit when it has none) and its hidden
        states (embedding output and every layer)."""
        out = self.teacher(**{k: batch[k] for k in MODEL_INPUTS if k in batch}, output_hidden_states=True)
        heads = get_exits(self.teacher)
        per_exit = dict(heads.logits) if heads is not None else {}
        per_exit["final"] = out.logits
        return per_exit, list(out.hidden_states)

    def distill_terms(
        self, module, batch: dict, logits: torch.Tensor, need_pred: bool, need_rep: bool
    ) -> dict:
        heads = get_exits(module.model)
        t_logits, t_hidden = self.teacher_outputs(batch)
        out = {}
        if need_pred:
            T = self.config.temperature
            terms = [soft_cross_entropy(logits, t_logits["final"], T)]
            for k, z in heads.logits.items():
                terms.append(soft_cross_entropy(z, t_logits.get(k, t_logits["final"]), T))
            out["pred"] = torch.stack(terms).sum()
        if need_rep:
            out["rep"] = hidden_states_mse(heads.hidden, t_hidden, batch.get("attention_mask"))
        return out

    @staticmethod
    def hard_exits(module, batch: dict) -> torch.Tensor:
        heads = get_exits(module.model)
        terms = [labelled_cross_entropy(z, batch["labels"]) for z in heads.logits.values()]
        return torch.stack(terms).sum() if terms else torch.zeros((), device=batch["labels"].device)

    def _objective(self, module, batch: dict, logits: torch.Tensor) -> torch.Tensor:
        c = self.config
        mode = self._mode(module.global_step)
        bs = batch["labels"].shape[0]
        parts: dict[str, torch.Tensor] = {}
        if mode in ("hard", "ta"):
            parts["hard_exits"] = self.hard_exits(module, batch)
        if mode != "hard":
            parts.update(
                self.distill_terms(
                    module, batch, logits, mode in ("ta", "pred_rep"), mode in ("rep", "pred_rep")
                )
            )
        for name, value in parts.items():
            module.log(f"train/loss_{name}", value, batch_size=bs)
        loss = logits.new_zeros((), dtype=torch.float32)
        scale = 0.5 if mode == "ta" else 1.0
        loss = loss + scale * c.hard_weight * parts.get("hard_exits", 0.0)
        loss = loss + scale * c.pred_weight * parts.get("pred", 0.0)
        return loss + c.rep_weight * parts.get("rep", 0.0)

    def importance_loss(self, module, batch: dict, logits: torch.Tensor) -> torch.Tensor:
        """The loss whose gradients score heads and neurons (the official ``--internal_loss``):
        ``0.9 pred + 0.1 hard + rep`` with a teacher, the labels' cross-entropy over all exits without."""
        hard = self.hard_exits(module, batch) + labelled_cross_entropy(logits, batch["labels"])
        if self.teacher is None:
            return hard
        parts = self.distill_terms(module, batch, logits, True, True)
        return 0.9 * parts["pred"] + 0.1 * hard + parts["rep"]

    def callbacks(self) -> list:
        from lightmods.callbacks.cost_eff import CostEffStages

        return [CostEffStages(self)]

    def summary(self, model: nn.Module) -> dict:
        out = super().summary(model)
        if self.params_original is not None:
            out["params_original"] = self.params_original
        return out
