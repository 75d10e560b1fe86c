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
