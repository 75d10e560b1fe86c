"""What structural-compression callbacks share: calibration batches that leave the global RNG alone, the
model's figures before and after compression for ``summary.json``, and applying a plan in the middle of a fit.

The before/after keys are the ones every compression method reports (``params_before/after``,
``flops_per_sample_before/after``, ``inference_samples_per_s_before/after``, ``model_memory_mb_before/after``,
``kv_cache_bytes_per_token_before/after`` (null for encoders), ``compression_ratio_params`` = parameters
before / after, ``speedup_inference`` = samples/s after / before, measured on the same batches).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, RandomSampler

from lightmods.callbacks.meters import time_inference, validation_batches
from lightmods.exits.flops import mean_sample_flops
from lightmods.structure import PruningPlan, refresh_training_state
from lightmods.structure.kv_cache import kv_cache_bytes_per_token
from lightmods.structure.spec import DECODER_LAYOUT, layout_of

FIGURES = ("params", "flops_per_sample", "inference_samples_per_s", "model_memory_mb", "kv_cache_bytes_per_token")


def calibration_batches(trainer, pl_module, samples: int, seed: int) -> Iterator[dict]:
    """``samples`` training rows (without replacement, at most the whole split) in batches of the run's
    size, on the module's device. The order comes from a generator seeded by ``seed``, never from the global
    RNG, so every DDP rank and a resumed run calibrate on the same rows and the dropout masks do not shift."""
    dm = trainer.datamodule
    ds = dm.datasets["train"]
    gen = torch.Generator().manual_seed(int(seed))
    sampler = RandomSampler(ds, replacement=False, num_samples=min(int(samples), len(ds)), generator=gen)
    loader = DataLoader(
        ds, batch_size=dm.cfg.batch_size, sampler=sampler, collate_fn=dm.collator,
        generator=torch.Generator().manual_seed(int(seed)),  # the loader's base seed: not the global RNG
    )  # fmt: skip
    for batch in loader:
        yield {k: v.to(pl_module.device) if torch.is_tensor(v) else v for k, v in batch.items()}


def is_decoder(model: torch.nn.Module) -> bool:
    """A causal decoder (LLaMA-style block layout): the models whose KV cache is worth reporting."""
    return layout_of(model) is DECODER_LAYOUT


def model_figures(trainer, pl_module, batches: list[dict]) -> dict:
    """The model as it is now: total parameters, analytic FLOPs per sample over the first evaluation split (as
    ``flops_per_sample`` in every summary), inference samples/s and weight memory over ``batches`` (None when
    there are none), and the KV-cache bytes per token for decoders (None for encoders)."""
    model = pl_module.model
    out: dict = dict.fromkeys(FIGURES)
    out["params"] = pl_module.method_summary()["params_total"]
    dm = trainer.datamodule
    if dm is not None and getattr(pl_module, "eval_splits", None):
        flops = mean_sample_flops(model, dm.eval_dataloader(next(iter(pl_module.eval_splits))))
        out["flops_per_sample"] = round(flops) if flops else None
    out.update(time_inference(trainer, pl_module, batches))
    if is_decoder(model):
        out["kv_cache_bytes_per_token"] = kv_cache_bytes_per_token(model)
    return out


def before_after(before: dict, after: dict) -> dict:
    """``<figure>_before`` / ``<figure>_after`` for every figure, plus the compression ratio of the
    parameters (before / after) and the inference speed-up (after / before)."""
    keys = [*FIGURES, *(k for k in {**before, **after} if k not in FIGURES)]
    out = {f"{k}_{when}": d.get(k) for k in keys for when, d in (("before", before), ("after", after))}
    pb, pa = before.get("params"), after.get("params")
    out["compression_ratio_params"] = round(pb / pa, 4) if pb and pa else None
    sb, sa = before.get("inference_samples_per_s"), after.get("inference_samples_per_s")
    out["speedup_inference"] = round(sa / sb, 4) if sb and sa else None
    return out


def measure(trainer, pl_module, n_batches: int) -> dict:
    """:func:`model_figures` over the first ``n_batches`` validation batches."""
    return model_figures(trainer, pl_module, validation_batches(trainer, pl_module, n_batches))


def restructure_mid_fit(trainer, pl_module, plan: PruningPlan) -> PruningPlan:
    """Apply ``plan`` (indices of the model as it is now) in the middle of a fit: rank 0's decision is
    broadcast so every DDP rank slices alike, the module composes it into its plan (saved in checkpoints and
    exports), and the optimizer, scheduler and DDP wrapper are rebuilt with their state carried over."""
    plan = PruningPlan.from_dict(trainer.strategy.broadcast(plan.to_dict(), src=0))
    pl_module.restructure(plan)
    refresh_training_state(trainer)
    return plan
