"""Training throughput and peak memory, for ``summary.json``."""

from __future__ import annotations

import resource
import time

import lightning as L
import torch


def peak_memory_mb(device: torch.device | None = None) -> float:
    """Peak GPU memory allocated by torch on CUDA; peak resident memory of this process on CPU."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class ThroughputMeter(L.Callback):
    """Training samples per second of wall-clock time between the ends of consecutive training batches:
    data loading, the optimizer step and logging count; validation does not. The first ``warmup``
    batches (allocation, caches) are skipped."""

    def __init__(self, warmup: int = 3):
        self.warmup = warmup
        self.samples = 0
        self.seconds = 0.0
        self.batches = 0
        self._last: float | None = None

    def _now(self, pl_module) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = self._now(pl_module)
        self.batches += 1
        if self._last is not None and self.batches > self.warmup:
            self.seconds += now - self._last
            self.samples += int(batch["labels"].shape[0])
        self._last = now

    def on_validation_start(self, trainer, pl_module):
        self._last = None  # the next interval starts after validation

    def split(self) -> float | None:
        """Close the current phase (e.g. before pruning): returns its samples/s and starts a new one,
        warm-up batches included."""
        value = self.samples_per_s
        self.samples, self.seconds, self.batches, self._last = 0, 0.0, 0, None
        return round(value, 3) if value else None

    @property
    def samples_per_s(self) -> float | None:
        return self.samples / self.seconds if self.seconds > 0 else None


def validation_batches(trainer, pl_module, n: int) -> list[dict]:
    """The first ``n`` validation batches of the trainer's DataModule, on the module's device."""
    dm = trainer.datamodule
    if n == 0 or dm is None:
        return []
    loader = dm.val_dataloader()
    loader = loader[0] if isinstance(loader, (list, tuple)) else loader
    batches = []
    for i, batch in enumerate(loader):
        if i >= n:
            break
        batches.append({k: v.to(pl_module.device) if torch.is_tensor(v) else v for k, v in batch.items()})
    return batches


@torch.no_grad()
def time_inference(trainer, pl_module, batches: list[dict]) -> dict:
    """Inference samples/s of ``pl_module`` in eval mode over ``batches`` (one warm-up pass first), the
    weights' memory and, on CUDA, the peak memory. Structural methods call it before and after pruning
    on the same batches, so the two figures compare like with like."""
    if not batches:
        return {}
    was_training = pl_module.training
    pl_module.eval()
    cuda = pl_module.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(pl_module.device)
    with trainer.precision_plugin.forward_context():
        pl_module(batches[0])  # warm-up
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for b in batches:
            pl_module(b)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    pl_module.train(was_training)
    first = next(k for k in ("input_ids", "pixel_values", "labels") if k in batches[0])
    samples = sum(int(b[first].shape[0]) for b in batches)
    out = {"inference_samples_per_s": round(samples / seconds, 3)}
    weights = sum(p.numel() * p.element_size() for p in pl_module.model.parameters())
    out["model_memory_mb"] = round(weights / 2**20, 2)
    if cuda:
        out["inference_peak_memory_mb"] = round(torch.cuda.max_memory_allocated(pl_module.device) / 2**20, 1)
    return out
