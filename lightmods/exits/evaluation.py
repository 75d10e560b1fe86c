"""Evaluation of a multi-exit model: per-exit accuracy during validation, and after fit an entropy-threshold
sweep of per-sample early-exit inference (accuracy, average exit layer, analytic FLOPs relative to the
original model, measured wall-clock samples/s) written to ``exit_curve.json``."""

from __future__ import annotations

import logging
import time

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightmods.exits.flops import FlopsProfile
from lightmods.exits.heads import get_exits
from lightmods.exits.runner import early_exit_forward

log = logging.getLogger("lightmods")
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _inputs(batch: dict) -> dict:
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def timed(fn, batches: list[dict], device: torch.device) -> tuple[list, float]:
    """``fn(batch)`` for every batch (after one warm-up batch): the results and the samples per second."""
    fn(batches[0])
    _sync(device)
    start = time.perf_counter()
    results = [fn(b) for b in batches]
    _sync(device)
    return results, sum(int(b["input_ids"].shape[0]) for b in batches) / (time.perf_counter() - start)


def samples_per_s(fn, batches: list[dict], device: torch.device) -> float:
    return timed(fn, batches, device)[1]


def select_point(points: list[dict], tolerance: float) -> dict:
    """The sweep point with the fewest FLOPs whose accuracy is within ``tolerance`` of no early exit."""
    full = max(points, key=lambda p: (p["avg_exit_layer"], -p["threshold"]))
    ok = [p for p in points if p["accuracy"] >= full["accuracy"] - tolerance - 1e-12]
    return min(ok, key=lambda p: (p["flops_relative"], -p["accuracy"]))


class ExitsEvaluation(L.Callback):
    """``val/accuracy_exit{k}`` for every exit at each validation; :meth:`final_evaluation` after fit.

    ``reference``: a model of the original architecture (e.g. COST-EFF's fine-tuned teacher) whose plain
    forward is timed as the baseline of the wall-clock speed-up."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.reference: nn.Module | None = None
        self.report: dict = {}
        self._correct: dict[int, torch.Tensor] = {}
        self._count = None

    # ---- during validation --------------------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._correct, self._count = {}, None

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        heads = get_exits(pl_module.model)
        if dataloader_idx != 0 or heads is None or "labels" not in batch:
            return
        labels = batch["labels"]
        keep = labels != -100
        for k, z in heads.all_logits().items():
            hit = (z.argmax(-1)[keep] == labels[keep]).sum().float()
            self._correct[k] = self._correct[k] + hit if k in self._correct else hit
        n = keep.sum().float()
        self._count = n if self._count is None else self._count + n

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self._correct:
            return
        keys = sorted(self._correct)
        totals = torch.stack([self._correct[k] for k in keys] + [self._count]).to(pl_module.device)
        totals = trainer.strategy.reduce(totals, reduce_op="sum")
        for k, c in zip(keys, totals[:-1]):
            pl_module.log(
                f"val/accuracy_exit{k}", c / totals[-1].clamp_min(1), sync_dist=True, add_dataloader_idx=False
            )

    # ---- after fit (rank 0) -------------------------------------------------------------------------------
    @torch.no_grad()
    def final_evaluation(self, module, dm, files) -> dict:
        """Per-exit accuracy and the threshold sweep on the first evaluation split; writes
        ``exit_curve.json``, fills :attr:`report` (for ``summary.json``) and returns metrics for
        ``metrics.json``."""
        model = module.model
        heads = get_exits(model)
        if heads is None:
            return {}
        device = module.device
        split = dm.eval_splits[0]
        bs = self.cfg.eval_batch_size or dm.cfg.eval_batch_size
        loader = DataLoader(dm.datasets[split], batch_size=bs, shuffle=False, collate_fn=dm.collator)
        batches = [{k: v.to(device) for k, v in b.items()} for b in loader]
        labels = torch.cat([b["labels"] for b in batches])
        keep = labels != -100
        was_training = model.training
        model.eval()
        try:
            # per-exit accuracy from the hooked forward (every exit evaluated on every sample)
            per_exit: dict[int, list[torch.Tensor]] = {}
            for b in batches:
                model(**_inputs(b))
                for k, z in heads.all_logits().items():
                    per_exit.setdefault(k, []).append(z.argmax(-1))
            accuracy_exit = {
                k: float((torch.cat(v)[keep] == labels[keep]).float().mean())
                for k, v in sorted(per_exit.items())
            }
            n_layers = heads.num_layers
            here = FlopsProfile.from_model(model)
            original = FlopsProfile.from_config(model.config)
            lengths = torch.cat([b["attention_mask"].sum(-1) for b in batches]).tolist()
            flops_original = sum(original.sample(n, exits_evaluated=False) for n in lengths)
            flops_full_depth = sum(here.sample(n, exits_evaluated=False) for n in lengths)

            capture = heads.capture
            heads.capture = False  # the plain forward as it would serve: no exit heads
            sps_full = (
                samples_per_s(lambda b: model(**_inputs(b)), batches, device) if self.cfg.timing else None
            )
            heads.capture = capture
            sps_reference = None
            if self.cfg.timing and self.reference is not None:
                ref = self.reference.to(device).eval()
                sps_reference = samples_per_s(lambda b: ref(**_inputs(b)), batches, device)

            points = []
            for tau in sorted(set(map(float, self.cfg.thresholds)), reverse=True):
                run = lambda b, t=tau: early_exit_forward(model, b, t)  # noqa: E731
                results, sps = (
                    timed(run, batches, device) if self.cfg.timing else ([run(b) for b in batches], None)
                )
                preds = torch.cat([r.logits.argmax(-1) for r in results])
                layers = torch.cat([r.exit_layer for r in results])
                flops = sum(
                    here.sample(n, k, exits_evaluated=tau > 0) for n, k in zip(lengths, layers.tolist())
                )
                avg_layer = float(layers[keep].float().mean())
                point = {
                    "threshold": tau,
                    "accuracy": float((preds[keep] == labels[keep]).float().mean()),
                    "avg_exit_layer": avg_layer,
                    "expected_speedup": n_layers / avg_layer,
                    "exit_layer_counts": {str(k): int((layers[keep] == k).sum()) for k in heads.exit_layers},
                    "flops_relative": flops / flops_original,
                    "flops_relative_to_full_depth": flops / flops_full_depth,
                    "samples_per_s": sps,
                    "speedup_vs_full_depth": sps / sps_full if sps and sps_full else None,
                    "speedup_vs_original": sps / sps_reference if sps and sps_reference else None,
                }
                points.append(point)
                log.info(
                    "early exit tau=%.3f: accuracy %.4f, average exit layer %.2f, FLOPs %.4f of the original%s",
                    tau, point["accuracy"], avg_layer, point["flops_relative"],
                    f", {sps:.1f} samples/s" if sps else "",
                )  # fmt: skip
        finally:
            model.train(was_training)
        selected = select_point(points, self.cfg.tolerance)
        n = len(lengths)
        curve = {
            "split": split,
            "num_samples": int(keep.sum()),
            "batch_size": bs,
            "num_layers": n_layers,
            "exit_start": heads.start,
            "accuracy_per_exit": {str(k): v for k, v in accuracy_exit.items()},
            "flops_original_per_sample": flops_original / n,
            "flops_full_depth_per_sample": flops_full_depth / n,
            "samples_per_s_full_depth": sps_full,
            "samples_per_s_original": sps_reference,
            "tolerance": self.cfg.tolerance,
            "selected": selected,
            "points": points,
        }
        files.write_json("exit_curve.json", curve)
        self.report.update(
            {
                "exit_curve": "exit_curve.json",
                "flops_before": round(flops_original / n),
                "flops_after": round(flops_full_depth / n),
                "flops_relative_full_depth": round(flops_full_depth / flops_original, 6),
                "exit_threshold": selected["threshold"],
                "flops_relative": round(selected["flops_relative"], 6),
                "accuracy_early_exit": round(selected["accuracy"], 6),
                "avg_exit_layer": round(selected["avg_exit_layer"], 4),
                "inference_samples_per_s_full_depth": round(sps_full, 3) if sps_full else None,
                "inference_samples_per_s_original": round(sps_reference, 3) if sps_reference else None,
                "inference_samples_per_s_early_exit": round(selected["samples_per_s"], 3)
                if selected["samples_per_s"]
                else None,
                "speedup_wall_vs_full_depth": round(selected["speedup_vs_full_depth"], 4)
                if selected["speedup_vs_full_depth"]
                else None,
                "speedup_wall_vs_original": round(selected["speedup_vs_original"], 4)
                if selected["speedup_vs_original"]
                else None,
            }
        )
        metrics = {f"val/accuracy_exit{k}": v for k, v in accuracy_exit.items()}
        metrics.update(
            {
                "val/accuracy_early_exit": selected["accuracy"],
                "val/avg_exit_layer": selected["avg_exit_layer"],
                "val/flops_relative": selected["flops_relative"],
            }
        )
        return {k: round(float(v), 6) for k, v in metrics.items()}
