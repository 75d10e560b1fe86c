"""COST-EFF's stages as one callback: load the fine-tuned teacher, freeze the teaching assistant (TA) at the
end of its stage, and slenderize the student at each prune event (Taylor importance over all exits, the
structural core's physical slicing, optimizer and schedule rebuilt). See ``lightmods/methods/cost_eff.py``.

``method.select=exits_mean``: the official checkpoint choice. Once the prune stage is over (the model at its
final size), each validation's accuracy averaged over all exits is compared, the best weights kept (a CPU copy
of the slender model), and put back when training ends, so the evaluation, the sweep and ``export/`` use them;
``last.ckpt`` keeps the last step's weights, to resume from.

Resuming: the TA's weights travel in this callback's checkpoint state (a resumed run rebuilds the unpruned
architecture and loads them); the pruning plan travels with the module, so a checkpoint saved after a prune
event resumes into the slender architecture, and one saved before prunes at the same steps.
"""

from __future__ import annotations

import copy
import logging

import lightning as L
import torch
from torch.utils.data import DataLoader, RandomSampler

from lightmods.errors import ConfigError
from lightmods.exits.heads import get_exits
from lightmods.structure import PruningPlan, blocks, refresh_training_state
from lightmods.structure.embedding import (
    embedding_rank,
    embedding_vocab,
    factorize_embedding,
    kept_token_ids,
    nearest_kept_ids,
    token_weights,
    trim_vocabulary,
    word_embedding_owner,
)
from lightmods.structure.slenderize import TaylorScores, interpolate, slender_plan

log = logging.getLogger("lightmods")


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen, eval-mode deep copy (its exit hooks are rebound to the copy's heads)."""
    heads = get_exits(model)
    if heads is not None:
        heads.clear()  # stashed activations are not copied
        heads.mask = None
    twin = copy.deepcopy(model).eval()
    twin.requires_grad_(False)
    return twin


def start_from_teacher(student: torch.nn.Module, teacher: torch.nn.Module, path: str) -> None:
    """Give the (unpruned) student the fine-tuned teacher's weights: every teacher entry whose name and shape the
    student shares (backbone, classifier); the exit heads and what the student replaced (the dense pooler when
    ``pooler_dense`` is off) keep theirs. Fails naming ``method.ta_init`` when a backbone weight finds no match."""
    s, t = student.state_dict(), teacher.state_dict()
    shared = {k: v for k, v in t.items() if k in s and s[k].shape == v.shape}
    prefix = student.base_model_prefix + "."
    unmatched = [k for k in s if k.startswith(prefix) and k not in shared and ".pooler." not in k]
    if unmatched:
        raise ConfigError(
            f"method.ta_init='teacher': the student's {unmatched[:3]} have no weight of the same shape in "
            f"{path!r}; accepted: a teacher exported from an unpruned run of the same model, or ta_init='pretrained'"
        )
    student.load_state_dict(shared, strict=False)
    log.info("COST-EFF: the TA starts from the teacher's weights (%d tensors)", len(shared))


class CostEffStages(L.Callback):
    def __init__(self, method):
        self.method = method
        self.c = method.config
        self.events_done = 0
        self.ta_taken = False
        self.report: dict = {}
        self._ta_state: dict | None = None  # TA weights restored from a checkpoint, loaded at train start
        self._token_weights: torch.Tensor | None = None  # method.emb_svd_weights=token_frequency, see token_weights
        self._best: dict | None = None  # method.select=exits_mean: {"score", "step", "epoch", "state"}

    @property
    def state_key(self) -> str:
        return "CostEffStages"

    # ---- state ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        ta = None
        if self.ta_taken and self.method.teacher is not None:
            ta = {k: v.detach().cpu() for k, v in self.method.teacher.state_dict().items()}
        return {
            "events_done": self.events_done,
            "ta_taken": self.ta_taken,
            "ta_state": ta,
            "report": self.report,
            "best": self._best,
        }

    def load_state_dict(self, state: dict) -> None:
        self.events_done = int(state["events_done"])
        self.ta_taken = bool(state["ta_taken"])
        self._ta_state = state.get("ta_state")
        self.report = dict(state.get("report", {}))
        self._best = state.get("best")

    # ---- set-up ---------------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or self.method.original_teacher is not None or not self.c.teacher:
            return
        from lightmods.export import load_export

        teacher = load_export(self.c.teacher)
        student = pl_module.model.config
        for key in ("num_hidden_layers", "hidden_size", "num_labels"):
            if getattr(teacher.config, key) != getattr(student, key):
                raise ConfigError(
                    f"method.teacher={self.c.teacher!r}: its {key}={getattr(teacher.config, key)} differs from the "
                    f"student's {getattr(student, key)}; accepted: a fine-tuned model of the same depth, width and labels"
                )
        teacher.requires_grad_(False)
        self.method.original_teacher = teacher.eval()
        self.method.teacher = self.method.original_teacher
        log.info("COST-EFF teacher loaded from %s", self.c.teacher)
        if self.c.ta_init == "teacher" and trainer.ckpt_path is None:
            start_from_teacher(pl_module.model, teacher, self.c.teacher)

    def on_fit_start(self, trainer, pl_module) -> None:
        from lightmods.exits.evaluation import ExitsEvaluation

        if self.method.teacher is not None:
            self.method.teacher.to(pl_module.device)
        for cb in trainer.callbacks:  # time the original architecture as the wall-clock baseline
            if isinstance(cb, ExitsEvaluation) and self.method.original_teacher is not None:
                cb.reference = self.method.original_teacher
        self.method.stages_for(int(trainer.estimated_stepping_batches))
        stages = self.method._stages
        self.report.update(
            {
                "stage_bounds": {k: list(v) for k, v in stages.bounds.items()},
                "prune_event_steps": stages.events,
            }
        )

    def on_train_start(self, trainer, pl_module) -> None:
        if self._ta_state is not None:  # resumed after the TA stage: rebuild the TA from its saved weights
            from lightmods.export import rebuild_model

            ta = rebuild_model(pl_module.run_config)
            ta.load_state_dict(self._ta_state)
            self.method.teacher = frozen_copy(ta).to(pl_module.device)
            self._ta_state = None

    # ---- stages ---------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stages = self.method.stages_for(int(trainer.estimated_stepping_batches))
        step = trainer.global_step
        if not self.ta_taken and stages.ta_end > 0 and step >= stages.ta_end:
            self.method.teacher = frozen_copy(pl_module.model)
            self.ta_taken = True
            self.report["ta_frozen_at_step"] = step
            log.info("COST-EFF: the teaching assistant is frozen at step %d and teaches from now on", step)
        while self.events_done < len(stages.events) and step >= stages.events[self.events_done]:
            self.prune(trainer, pl_module, self.events_done + 1, len(stages.events))

    # ---- checkpoint selection (method.select=exits_mean) ------------------------------------------------
    def on_validation_end(self, trainer, pl_module) -> None:
        if self.c.select != "exits_mean" or trainer.sanity_checking:
            return
        stages = self.method.stages_for(int(trainer.estimated_stepping_batches))
        if trainer.global_step < stages.bounds["prune"][1] or self.events_done < len(stages.events):
            return  # the model is not at its final size yet
        metrics = trainer.callback_metrics
        exits = [float(v) for k, v in metrics.items() if k.startswith("val/accuracy_exit")]
        if not exits:
            raise ConfigError(
                "method.select='exits_mean': no val/accuracy_exit* metric was logged; accepted: exits on a "
                "classification task with labelled validation rows, or method.select='last'"
            )
        score = sum(exits) / len(exits)
        if self._best is None or score > self._best["score"]:
            state = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.model.state_dict().items()}
            self._best = {"score": score, "step": trainer.global_step, "epoch": trainer.current_epoch, "state": state}
            log.info("COST-EFF: best validation so far by the mean over %d exits: %.4f at step %d",
                     len(exits), score, trainer.global_step)  # fmt: skip

    def on_train_end(self, trainer, pl_module) -> None:
        if self.c.select != "exits_mean":
            return
        if self._best is None:
            log.warning("method.select='exits_mean': no validation after the prune stage; the last weights are kept")
            return
        pl_module.model.load_state_dict(self._best["state"])
        self.report.update(
            {
                "selected_step": self._best["step"],
                "selected_epoch": self._best["epoch"],
                "selected_exits_mean": round(self._best["score"], 6),
            }
        )
        log.info("COST-EFF: ending on the weights of step %d (epoch %d), mean accuracy over exits %.4f",
                 self._best["step"], self._best["epoch"], self._best["score"])  # fmt: skip

    # ---- slenderization -------------------------------------------------------------------------------
    def targets(self, event: int, events: int) -> tuple[int | None, int | None, int | None]:
        full, c = self.method.full_sizes, self.c
        heads, ffn, rank = (
            interpolate(full[part], target, event, events, c.prune_schedule) if target else None
            for part, target in (("heads", c.target_heads), ("ffn", c.target_ffn), ("hidden", c.target_emb_rank))
        )
        return heads, ffn, rank

    def token_weights(self, trainer, model) -> torch.Tensor:
        """``method.emb_svd_weights=token_frequency``: each token's count in the encoded training split (+1),
        counted at the first prune event and kept for the others (the split and the vocabulary do not change).
        Every DDP rank holds the whole split, so every rank computes the same weights."""
        if self._token_weights is None:
            owner, attr = word_embedding_owner(model)
            vocab = getattr(owner, attr).num_embeddings
            self._token_weights = token_weights(trainer.datamodule.datasets["train"].features["input_ids"], vocab)
        return self._token_weights

    def kept_vocabulary(self, trainer, model) -> tuple[list[int], int | list[int]]:
        """``method.emb_vocab=train``: the token ids that occur at least ``method.emb_min_count`` times in the
        encoded training split and the tokenizer's special tokens, and what the others fall back to: [UNK]
        (``method.emb_fallback=unk``) or, per id, the kept id nearest in the current word embedding (``nearest``). Every DDP rank computes the same from the same
        split and the same weights."""
        tok = trainer.datamodule.tokenizer
        if tok.unk_token_id is None:
            raise ConfigError(
                f"method.emb_vocab='train': the tokenizer {type(tok).__name__} has no unknown token for the "
                "dropped ids to read; accepted: a tokenizer with unk_token, or method.emb_vocab='all'"
            )
        owner, attr = word_embedding_owner(model)
        kept = kept_token_ids(
            trainer.datamodule.datasets["train"].features["input_ids"],
            {*tok.all_special_ids, tok.unk_token_id},
            getattr(owner, attr).num_embeddings,
            self.c.emb_min_count,
        )
        if self.c.emb_fallback == "nearest":
            emb = getattr(owner, attr)
            with torch.no_grad():  # every id's row, plain or factorised
                weight = emb(torch.arange(emb.num_embeddings, device=next(emb.parameters()).device))
            return kept.tolist(), nearest_kept_ids(weight, kept).tolist()
        return kept.tolist(), int(tok.unk_token_id)

    def importance(self, trainer, pl_module, event: int) -> TaylorScores:
        """Taylor scores from the loss over all exits, on training batches drawn with a generator seeded by
        the event (so every DDP rank and a resumed run score the same batches), dropout off."""
        model = pl_module.model
        scores = TaylorScores(model)
        params = scores.params()
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(True)
        dm = trainer.datamodule
        ds = dm.datasets["train"]
        gen = torch.Generator().manual_seed(int(getattr(dm, "seed", 0)) * 1009 + event)
        loader = DataLoader(
            ds, batch_size=dm.cfg.batch_size, sampler=RandomSampler(ds, replacement=True, generator=gen),
            collate_fn=dm.collator, generator=torch.Generator().manual_seed(event),  # not the global RNG
        )  # fmt: skip
        n_batches = self.c.taylor_batches or len(loader)
        was_training = model.training
        model.eval()
        try:
            for i, batch in enumerate(loader):
                if i >= n_batches:
                    break
                batch = {k: v.to(pl_module.device) for k, v in batch.items()}
                with torch.enable_grad(), trainer.precision_plugin.forward_context():
                    logits = pl_module(batch)
                    loss = self.method.importance_loss(pl_module, batch, logits)
                    grads = torch.autograd.grad(loss, params, allow_unused=True)
                scores.add(grads)
        finally:
            model.train(was_training)
            for p, f in zip(params, flags):
                p.requires_grad_(f)
        return scores

    def prune(self, trainer, pl_module, event: int, events: int) -> None:
        model = pl_module.model
        if "params_foundation_before" not in self.report:
            before = pl_module.method_summary()
            self.report.update(
                {
                    "params_foundation_before": before["params_by_role"]["backbone"]["total"],
                    "params_total_before": before["params_total"],
                    "params_trainable_before": before["params_trainable"],
                }
            )
        heads, ffn, rank = self.targets(event, events)
        current = embedding_rank(model)
        if rank is not None and rank >= (current or self.method.full_sizes["hidden"]):
            rank = None  # nothing to factorise yet
        plan = slender_plan(self.importance(trainer, pl_module, event), heads, ffn, rank)
        plan = PruningPlan.from_dict(trainer.strategy.broadcast(plan.to_dict(), src=0))
        if self.c.emb_vocab == "train" and embedding_vocab(model) is None:
            # before the weighted factorisation, so the SVD is spent on the kept rows only
            plan.embedding_vocab, plan.embedding_fallback = self.kept_vocabulary(trainer, model)
            trim_vocabulary(model, plan.embedding_vocab, plan.embedding_fallback)
        if plan.embedding_rank is not None and self.c.emb_svd_weights == "token_frequency":
            # the plan's own factorisation (plain SVD, also what a resumed run rebuilds the shapes with) then
            # finds the embedding already at that rank; the weights only change which subspace is kept
            factorize_embedding(model, plan.embedding_rank, self.token_weights(trainer, model))
        pl_module.restructure(plan)
        refresh_training_state(trainer)
        self.events_done = event
        after = pl_module.method_summary()
        model_blocks = blocks(model)
        self.report.update(
            {
                "params_foundation_after": after["params_by_role"]["backbone"]["total"],
                "params_total_after": after["params_total"],
                "params_trainable_after": after["params_trainable"],
                "heads_kept_per_layer": [b.num_heads for b in model_blocks],
                "neurons_kept_per_layer": [b.num_neurons for b in model_blocks],
                "embedding_rank": embedding_rank(model),
                **({"embedding_vocab_kept": embedding_vocab(model)} if self.c.emb_vocab != "all" else {}),
                "prune_events_done": event,
                "pruned_at_step": trainer.global_step,
            }
        )
        for lg in trainer.loggers:
            lg.log_metrics(
                {"prune/params_total": float(after["params_total"]), "prune/event": float(event)},
                step=trainer.global_step,
            )
        log.info(
            "COST-EFF prune event %d/%d at step %d: heads %s, FFN %s, embedding rank %s -> %s parameters",
            event, events, trainer.global_step, heads, ffn, embedding_rank(model), f"{after['params_total']:,}",
        )  # fmt: skip
