"""The stages of mask-based structured pruning (``method=mask_prune``, SIMPLE) as one callback: load the
teacher, run sparse training until ``sparse_steps``, then extract every requested size by a threshold on the
learned masks (each exported with its plan), and go on fine-tuning the ``finetune_size`` model.

Sizes are fractions of the parameters of the model without its masks. For a threshold ``tau`` the kept
structures are those whose mask has ``|m| > tau`` (at least one attention unit and one FFN neuron per layer
and one hidden channel stay) and the surviving mask values are folded into the weights (``fold_masks``); the parameter count falls as ``tau`` rises, so the smallest candidate ``tau``
(a mask value) whose model has at most ``size`` of the parameters is found by bisection, counting the
parameters of the model sliced on the meta device (exact, no memory). ``threshold_scope=per_kind`` bisects
instead on the share kept of each kind (units, neurons, hidden channels), one threshold per kind.
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

import lightning as L
import torch
from torch import nn

from lightmods.callbacks.meters import time_inference, validation_batches
from lightmods.errors import config_error
from lightmods.exits.flops import mean_sample_flops
from lightmods.structure import PruningPlan, blocks, get_gates, refresh_training_state, remove_gates
from lightmods.structure.kv_cache import kv_cache_bytes_per_token

log = logging.getLogger("lightmods")


def plan_at_threshold(gates, model_blocks, tau: float) -> PruningPlan:
    """Keep every structure whose mask magnitude exceeds ``tau`` (the largest one where none would)."""

    def kept(values: torch.Tensor) -> list[int]:
        v = values.detach().float().abs().cpu()
        idx = torch.nonzero(v > tau).flatten().tolist()
        return idx or [int(torch.argmax(v))]

    plan = PruningPlan()
    for i, b in enumerate(model_blocks):
        if gates.heads is not None:
            plan.heads[b.index] = kept(gates.heads[i])
        if gates.neurons is not None:
            plan.neurons[b.index] = kept(gates.neurons[i])
    if gates.hidden is not None:
        hidden = kept(gates.hidden)
        if len(hidden) < gates.hidden.numel():
            plan.hidden = hidden
    return plan


def mask_values(gates) -> torch.Tensor:
    """Every mask magnitude, sorted (the candidate thresholds)."""
    parts = [p.detach().float().abs().flatten().cpu() for group in (gates.heads, gates.neurons) if group is not None for p in group]
    if gates.hidden is not None:
        parts.append(gates.hidden.detach().float().abs().cpu())
    return torch.unique(torch.cat(parts))


def bare_copy(model: nn.Module, device: str | torch.device = "meta") -> nn.Module:
    """A copy of ``model`` without gates (their hooks are detached while copying), on ``device``."""
    gates = get_gates(model)
    if gates is not None:
        gates.detach_hooks()
    try:
        clone = copy.deepcopy(model)
    finally:
        if gates is not None:
            gates.attach(blocks(model))
    remove_gates(clone)
    return clone.to(device)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def plan_at_ratio(gates, model_blocks, ratio: float) -> PruningPlan:
    """Keep the top ``ceil(ratio * n)`` structures of each kind (all attention units, all FFN neurons, the
    hidden channels) by mask magnitude: one threshold per kind, so every kind keeps the same share."""

    def top(values: list[torch.Tensor]) -> list[list[int]]:
        flat = torch.cat([v.detach().float().abs().flatten().cpu() for v in values])
        k = max(1, math.ceil(ratio * flat.numel()))
        chosen = set(torch.argsort(flat, descending=True, stable=True)[:k].tolist())
        out, offset = [], 0
        for v in values:
            kept = [j for j in range(v.numel()) if offset + j in chosen]
            out.append(kept or [int(torch.argmax(v.detach().abs()))])
            offset += v.numel()
        return out

    plan = PruningPlan()
    if gates.heads is not None:
        plan.heads = {b.index: kept for b, kept in zip(model_blocks, top(list(gates.heads)))}
    if gates.neurons is not None:
        plan.neurons = {b.index: kept for b, kept in zip(model_blocks, top(list(gates.neurons)))}
    if gates.hidden is not None:
        (hidden,) = top([gates.hidden])
        if len(hidden) < gates.hidden.numel():
            plan.hidden = hidden
    return plan


def plan_for_size(model: nn.Module, restructure, size: float, scope: str = "global") -> tuple[PruningPlan, float, int, int]:
    """(plan, threshold or ratio, parameters kept, parameters of the model without masks) for ``size``:
    ``global``: the smallest mask value as threshold whose model has at most ``size`` of the parameters;
    ``per_kind``: the largest share kept of each kind (steps of 1/1000) whose model fits."""
    gates = get_gates(model)
    model_blocks = blocks(model)
    meta = bare_copy(model)
    total = count_params(meta)
    if scope == "global":
        candidates = [-1.0, *mask_values(gates).tolist()]  # -1: keep everything; larger values keep less
        make = lambda t: plan_at_threshold(gates, model_blocks, t)  # noqa: E731
    else:
        candidates = [i / 1000 for i in range(1000, 0, -1)]  # shares kept, falling
        make = lambda r: plan_at_ratio(gates, model_blocks, r)  # noqa: E731

    def params(i: int) -> tuple[PruningPlan, int]:
        plan = make(candidates[i])
        return plan, count_params(restructure(copy.deepcopy(meta), plan))

    lo, hi = 0, len(candidates) - 1  # the model shrinks as the index grows
    while lo < hi:  # the first candidate whose model fits in ``size``
        mid = (lo + hi) // 2
        if params(mid)[1] <= size * total:
            hi = mid
        else:
            lo = mid + 1
    plan, kept = params(hi)
    return plan, candidates[hi], kept, total


class MaskPruning(L.Callback):
    def __init__(self, config, method):
        self.c = config
        self.method = method
        self.done = False
        self.report: dict = {}
        self._student_hooks: list = []

    def state_dict(self) -> dict:
        return {"done": self.done, "report": self.report}

    def load_state_dict(self, state: dict) -> None:
        self.done = bool(state["done"])
        self.report = dict(state.get("report", {}))

    # ---- set-up ---------------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        if self.c.teacher and self.method.teacher is None:
            self._load_teacher(pl_module.model)
        if self.method.teacher is not None and self.c.rep_weight > 0 and not self._student_hooks:
            from lightmods.methods.mask_prune import capture_block_outputs

            sink = lambda m: self.method.student_hidden if m.training else None  # noqa: E731
            self._student_hooks = capture_block_outputs(pl_module.model, sink)

    def _load_teacher(self, student: nn.Module) -> None:
        from lightmods.methods.mask_prune import capture_block_outputs
        from lightmods.methods.teacher import inherit_weights, load_teacher

        teacher = load_teacher(self.c.teacher, student)
        if self.c.init_from_teacher:
            inherit_weights(student, teacher, self.c.teacher, own=lambda name: "structure_gates" in name)
        teacher.teacher_hidden = []
        capture_block_outputs(teacher, lambda m: teacher.teacher_hidden)
        self.method.teacher = teacher
        log.info("mask_prune: teacher loaded from %s", self.c.teacher)

    def on_train_start(self, trainer, pl_module) -> None:
        total = int(trainer.estimated_stepping_batches)
        if not self.done and total <= self.c.sparse_steps:
            raise config_error("method.sparse_steps", self.c.sparse_steps, f"fewer than the run's {total} optimizer steps (extraction and fine-tuning follow sparse training)")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.method.student_hidden.clear()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.method.student_hidden.clear()
        if not self.done and trainer.global_step >= self.c.sparse_steps:
            self.extract(trainer, pl_module)

    # ---- extraction -----------------------------------------------------------------------------------
    def _measure(self, trainer, pl_module, model: nn.Module, batches: list) -> dict:
        """Parameters, FLOPs per sample, inference samples/s and (decoders) KV-cache bytes per token of ``model``."""
        live = pl_module.model
        pl_module.model = model
        try:
            timing = time_inference(trainer, pl_module, batches)
        finally:
            pl_module.model = live
        flops = mean_sample_flops(model, batches) if batches else None
        out = {
            "params": count_params(model),
            "flops_per_sample": round(flops) if flops else None,
            "inference_samples_per_s": timing.get("inference_samples_per_s"),
        }
        if self.method.family is not None and self.method.family.name == "llama":
            out["kv_cache_bytes_per_token"] = kv_cache_bytes_per_token(model)
        return out

    def extract(self, trainer, pl_module) -> None:
        model = pl_module.model
        batches = validation_batches(trainer, pl_module, self.c.inference_batches)
        device = pl_module.device
        before = self._measure(trainer, pl_module, bare_copy(model, device), batches)
        plans, sizes = {}, {}
        restructure = self.method.restructure
        root = Path(trainer.default_root_dir) / "extracted"
        for size in sorted(self.c.extract_sizes, reverse=True):
            plan, tau, _, _ = plan_for_size(model, restructure, size, self.c.threshold_scope)
            plan = PruningPlan.from_dict(trainer.strategy.broadcast(plan.to_dict(), src=0))
            plans[size] = plan
            extracted = restructure(self._extraction_copy(model, device), plan)
            after = self._measure(trainer, pl_module, extracted, batches)
            entry = self._figures(before, after)
            entry.update({"threshold": round(float(tau), 6), **plan.kept_per_layer(blocks(extracted))})
            if getattr(plan, "hidden", None) is not None:
                entry["hidden_kept"] = len(plan.hidden)
            if trainer.is_global_zero:
                from lightmods.export import export_model

                out = export_model(extracted, root / f"size_{size:g}", pl_module.run_config,
                                   self.method.head_patterns(), self.method.name, plan=plan)  # fmt: skip
                entry["export"] = str(out)
            sizes[f"{size:g}"] = entry
            del extracted
        size = self.c.train_size
        pl_module.restructure(plans[size])
        refresh_training_state(trainer)
        self.done = True
        self.report = {
            "extracted_at_step": trainer.global_step,
            "finetune_size": size,
            **{k: v for k, v in sizes[f"{size:g}"].items() if k != "export"},
            "sizes": sizes,
        }
        figures = {f"prune/{k}": float(v) for k, v in self.report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for lg in trainer.loggers:
            lg.log_metrics(figures, step=trainer.global_step)
        log.info(
            "mask_prune extracted at step %d: sizes %s; fine-tuning size %g (%s -> %s parameters)",
            trainer.global_step, list(sizes), size, f"{self.report['params_before']:,}", f"{self.report['params_after']:,}",
        )  # fmt: skip

    def _extraction_copy(self, model: nn.Module, device) -> nn.Module:
        """A gate-free copy of ``model`` with the mask values folded into its weights (``fold_masks``)."""
        from lightmods.structure.gates import fold_gates

        clone = bare_copy(model, device)
        if self.c.fold_masks:
            fold_gates(clone, get_gates(model))
        return clone

    @staticmethod
    def _figures(before: dict, after: dict) -> dict:
        out = {}
        for key in ("params", "flops_per_sample", "inference_samples_per_s", "kv_cache_bytes_per_token"):
            if key in before:
                out[f"{key}_before"], out[f"{key}_after"] = before[key], after[key]
        out["compression_ratio_params"] = round(before["params"] / after["params"], 4)
        sb, sa = before.get("inference_samples_per_s"), after.get("inference_samples_per_s")
        out["speedup_inference"] = round(sa / sb, 4) if sa and sb else None
        return out
