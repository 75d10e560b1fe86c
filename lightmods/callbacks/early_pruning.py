"""Light-PEFT's early pruning as a callback: estimate importances during the first ``estimate_steps``
optimizer steps, then prune the foundation model and the PEFT modules physically and go on training.

Importances (as in the official code): attention units and FFN neurons are scored by their trained gate
values (signed); a PEFT module by the ratio of its output norm to the frozen layer's output norm, averaged
over non-padding tokens; a rank by ``|mean_j(A * dA)| + |mean_i(B * dB)|`` (first-order Taylor). Module and
rank scores are averaged over the second half of the estimation window and reduced across DDP ranks; rank
0's plan is broadcast so every rank slices the same way.
"""

from __future__ import annotations

import logging
import math

import lightning as L
import torch

from lightmods.callbacks.meters import ThroughputMeter, time_inference, validation_batches
from lightmods.peft import adapter_layers
from lightmods.structure import PruningPlan, blocks, get_gates, refresh_training_state
from lightmods.structure.importance import output_ratio, rank_taylor

log = logging.getLogger("lightmods")


def n_to_prune(n: int, ratio: float) -> int:
    """How many of ``n`` scores fall at or below their ``ratio`` quantile (numpy's linear quantile, kept
    strictly above it, as the official selection) for distinct scores; ties no longer change the count."""
    return 0 if ratio <= 0 or n == 0 else min(n, math.floor((n - 1) * ratio) + 1)


def lowest(scores: torch.Tensor, k: int) -> set[int]:
    return set(torch.argsort(scores, stable=True)[:k].tolist())


def keep_top(scores: torch.Tensor, ratio: float, minimum: int = 0) -> list[int]:
    k = min(n_to_prune(scores.numel(), ratio), scores.numel() - minimum)
    drop = lowest(scores, k)
    return [i for i in range(scores.numel()) if i not in drop]


class EarlyPruning(L.Callback):
    def __init__(self, config):
        self.c = config
        self.done = False
        self.module_sum: torch.Tensor | None = None
        self.module_count = 0
        self.rank_sum: list[torch.Tensor] | None = None
        self.rank_count = 0
        self.report: dict = {}
        self._names: list[str] = []
        self._handles: list = []
        self._token_mask: torch.Tensor | None = None
        self._base_out: dict[int, torch.Tensor] = {}
        self._step = 0

    # ---- bookkeeping --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        cpu = lambda t: t.detach().cpu() if torch.is_tensor(t) else t  # noqa: E731
        return {
            "done": self.done,
            "module_sum": cpu(self.module_sum),
            "module_count": self.module_count,
            "rank_sum": [cpu(r) for r in self.rank_sum] if self.rank_sum is not None else None,
            "rank_count": self.rank_count,
            "report": self.report,
        }

    def load_state_dict(self, state: dict) -> None:
        self.done = bool(state["done"])
        self.module_sum, self.module_count = state["module_sum"], int(state["module_count"])
        self.rank_sum, self.rank_count = state["rank_sum"], int(state["rank_count"])
        self.report = dict(state.get("report", {}))

    def _recording(self, trainer) -> bool:
        return not self.done and self.c.prune_peft and trainer.global_step >= self.c.estimate_steps // 2

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or self.done:
            return
        layers = list(adapter_layers(pl_module.model))
        self._names = [n for n, _ in layers]
        for i, (_, layer) in enumerate(layers):
            self._handles.append(layer.base_layer.register_forward_hook(self._keep_base_output(i)))
            self._handles.append(layer.register_forward_hook(self._module_ratio(i, trainer)))

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._base_out.clear()

    def _keep_base_output(self, i: int):
        def hook(module, args, out):
            if module.training:
                self._base_out[i] = out.detach()

        return hook

    def _module_ratio(self, i: int, trainer):
        @torch.no_grad()
        def hook(module, args, out):
            base = self._base_out.pop(i, None)
            if base is None or not module.training or not self._recording(trainer):
                return
            value = output_ratio(out.detach(), base, self._token_mask)
            if self.module_sum is None:
                self.module_sum = torch.zeros(len(self._names), dtype=torch.float32, device=value.device)
            self.module_sum = self.module_sum.to(value.device)
            self.module_sum[i] += value  # stays on the device: no synchronisation per module
            if i == 0:
                self.module_count += 1

        return hook

    # ---- estimation ---------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        self._token_mask = mask.to(torch.float32) if mask is not None else None

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self._recording(trainer):
            return
        scores = []
        for _, layer in adapter_layers(pl_module.model):
            s = rank_taylor(layer)
            scores.append(
                s.double().cpu()
                if s is not None
                else torch.zeros(layer.rank_factors()[0].shape[0], dtype=torch.float64)
            )
        if self.rank_sum is None:
            self.rank_sum = [torch.zeros_like(s) for s in scores]
        for acc, s in zip(self.rank_sum, scores):
            acc += s
        self.rank_count += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.done and trainer.global_step >= self.c.estimate_steps:
            self.prune(trainer, pl_module)

    # ---- the decision -------------------------------------------------------------------------------
    def decide(self, trainer, pl_module) -> PruningPlan:
        c = self.c
        plan = PruningPlan()
        gen = torch.Generator().manual_seed(trainer.global_step)
        strategy = trainer.strategy
        gates = get_gates(pl_module.model)
        if c.prune_foundation and gates is not None:
            head_scores = [g.detach().float().cpu() for g in gates.heads] if gates.heads is not None else []
            neuron_scores = (
                [g.detach().float().cpu() for g in gates.neurons] if gates.neurons is not None else []
            )
            if c.random_scores:
                head_scores = [torch.rand(s.shape, generator=gen) for s in head_scores]
                neuron_scores = [torch.rand(s.shape, generator=gen) for s in neuron_scores]
            model_blocks = blocks(pl_module.model)
            for block, s in zip(model_blocks, head_scores):
                plan.heads[block.index] = keep_top(s, c.head_prune_ratio, minimum=1)
            if c.neuron_scope == "layerwise":
                for block, s in zip(model_blocks, neuron_scores):
                    plan.neurons[block.index] = keep_top(s, c.neuron_prune_ratio, minimum=1)
            elif neuron_scores:
                flat = torch.cat(neuron_scores)
                drop = lowest(flat, n_to_prune(flat.numel(), c.neuron_prune_ratio))
                offset = 0
                for block, s in zip(model_blocks, neuron_scores):
                    kept = [j for j in range(s.numel()) if offset + j not in drop]
                    plan.neurons[block.index] = kept or [int(torch.argmax(s))]
                    offset += s.numel()
        if c.prune_peft and self._names:
            modules = self._mean(self.module_sum, self.module_count, len(self._names), strategy)
            ranks = [self._mean(r, self.rank_count, r.numel(), strategy) for r in (self.rank_sum or [])]
            if not ranks:
                ranks = [
                    torch.zeros(layer.rank_factors()[0].shape[0])
                    for _, layer in adapter_layers(pl_module.model)
                ]
            if c.random_scores:
                modules = torch.rand(modules.shape, generator=gen)
                ranks = [torch.rand(r.shape, generator=gen) for r in ranks]
            kept = keep_top(modules, c.module_prune_ratio, minimum=1)
            plan.removed_adapters = [n for i, n in enumerate(self._names) if i not in set(kept)]
            flat = torch.cat([ranks[i] for i in kept])
            drop = lowest(flat, n_to_prune(flat.numel(), c.rank_prune_ratio))
            offset = 0
            for i in kept:
                r = ranks[i].numel()
                keep_r = [j for j in range(r) if offset + j not in drop]
                offset += r
                if not keep_r:  # every rank pruned: the module goes, as in the official code
                    plan.removed_adapters.append(self._names[i])
                elif len(keep_r) < r:
                    plan.ranks[self._names[i]] = keep_r
            plan.removed_adapters.sort()
        return PruningPlan.from_dict(strategy.broadcast(plan.to_dict(), src=0))

    @staticmethod
    def _mean(total, count, n, strategy) -> torch.Tensor:
        value = (total / max(count, 1)) if total is not None else torch.zeros(n)
        return strategy.reduce(value.float().to(strategy.root_device), reduce_op="mean").double().cpu()

    # ---- pruning ------------------------------------------------------------------------------------
    def prune(self, trainer, pl_module) -> None:
        self._remove_hooks()
        model = pl_module.model
        before = pl_module.method_summary()
        infer_before = self._time_inference(trainer, pl_module)
        plan = self.decide(trainer, pl_module)
        pl_module.restructure(plan)
        refresh_training_state(trainer)
        self.done = True
        after = pl_module.method_summary()
        infer_after = self._time_inference(trainer, pl_module)
        meter = next((cb for cb in trainer.callbacks if isinstance(cb, ThroughputMeter)), None)
        if meter is not None:
            self.report["train_samples_per_s_before"] = meter.split()
        self.report.update(
            {
                "pruned_at_step": trainer.global_step,
                "params_foundation_before": before["params_by_role"]["backbone"]["total"],
                "params_foundation_after": after["params_by_role"]["backbone"]["total"],
                "params_trainable_before": before["params_trainable"],
                "params_trainable_after": after["params_trainable"],
                "peft_modules_before": len(self._names),
                "peft_modules_after": len(self._names) - len(plan.removed_adapters),
                **plan.kept_per_layer(blocks(model)),
                **{f"{k}_before": v for k, v in infer_before.items()},
                **{f"{k}_after": v for k, v in infer_after.items()},
            }
        )
        figures = {
            f"prune/{k}": float(v)
            for k, v in self.report.items()
            if isinstance(v, (int, float)) and v is not None
        }
        for lg in trainer.loggers:
            lg.log_metrics(figures, step=trainer.global_step)
        log.info(
            "Light-PEFT pruned at step %d: foundation %s -> %s parameters, trainable %s -> %s, heads per layer %s",
            trainer.global_step, f"{self.report['params_foundation_before']:,}", f"{self.report['params_foundation_after']:,}",
            f"{self.report['params_trainable_before']:,}", f"{self.report['params_trainable_after']:,}", self.report["heads_kept_per_layer"],
        )  # fmt: skip

    def _time_inference(self, trainer, pl_module) -> dict:
        """Inference samples/s (and peak GPU memory) over the first validation batches, without gates."""
        batches = validation_batches(trainer, pl_module, self.c.inference_batches)
        gates = get_gates(pl_module.model)
        if gates is not None:  # time the model as it will serve: without gate multiplications
            gates.detach_hooks()
        out = time_inference(trainer, pl_module, batches)
        if gates is not None:
            gates.attach(blocks(pl_module.model))
        return out
