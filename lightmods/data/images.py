"""Image classification data: the generated ``images/synthetic`` task and its DataModule.

Each image shows its class's pattern (horizontal, vertical or diagonal stripes, or a checkerboard) with a
random period, phase and per-channel amplitude, plus Gaussian noise; classes are balanced and the split is
fixed by ``data.image.seed``. Rows carry ``pixel_values`` (``channels x size x size`` floats), ``label`` and
``idx``, so the rest of the run (evaluation, predictions, metrics) treats them like text rows.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset

from lightmods.config.schema import DataConfig
from lightmods.data.datamodule import TextClassificationDataModule
from lightmods.data.tasks import TaskSpec
from lightmods.errors import config_error


def pattern(kind: int, size: int, period: float, phase: float) -> torch.Tensor:
    """One ``size x size`` pattern in [-1, 1]: 0 horizontal stripes, 1 vertical, 2 diagonal, 3 checkerboard."""
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij")
    w = 2 * math.pi / period
    if kind == 0:
        return torch.sin(w * y + phase)
    if kind == 1:
        return torch.sin(w * x + phase)
    if kind == 2:
        return torch.sin(w * (x + y) / math.sqrt(2) + phase)
    return torch.sign(torch.sin(w * x + phase)) * torch.sign(torch.sin(w * y + phase))


def synthetic_images(n: int, num_classes: int, size: int, channels: int, noise: float, seed: int) -> tuple[torch.Tensor, list[int]]:
    """``n`` images (``n x channels x size x size``) and their labels, classes balanced and shuffled."""
    g = torch.Generator().manual_seed(seed)
    labels = [i % num_classes for i in range(n)]
    order = torch.randperm(n, generator=g).tolist()
    labels = [labels[i] for i in order]
    images = torch.empty(n, channels, size, size)
    for i, label in enumerate(labels):
        period = 4 + 4 * float(torch.rand((), generator=g))
        phase = 2 * math.pi * float(torch.rand((), generator=g))
        amplitude = 0.5 + torch.rand(channels, 1, 1, generator=g)
        base = pattern(label % 4, size, period, phase)
        images[i] = amplitude * base + noise * torch.randn(channels, size, size, generator=g)
    return images, labels


def generate_image_rows(cfg: DataConfig, num_classes: int, size: int, channels: int) -> dict[str, list[dict]]:
    """The ``train`` and ``validation`` rows of the synthetic task (different seeds, so no image repeats)."""
    c = cfg.image
    out = {}
    for split, n, offset in (("train", c.num_train, 0), ("validation", c.num_val, 1)):
        images, labels = synthetic_images(n, num_classes, size, channels, c.noise, c.seed * 2 + offset)
        out[split] = [{"pixel_values": images[i], "label": labels[i], "idx": i} for i in range(n)]
    return out


class ImageDataset(Dataset):
    """Rows as ``{"pixel_values", "labels", "idx"}``; ``features`` holds the columns (as the text datasets)."""

    def __init__(self, features: dict[str, list]):
        self.features = features
        self.length = len(features["labels"])

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.features.items()}


class ImageCollator:
    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = {"pixel_values": torch.stack([r["pixel_values"] for r in rows])}
        for key in ("labels", "idx"):
            batch[key] = torch.tensor([r[key] for r in rows], dtype=torch.long)
        return batch


class ImageClassificationDataModule(TextClassificationDataModule):
    """The text DataModule's splits, loaders and checks for image rows: no tokenizer, no tokenisation cache.
    ``size`` / ``channels``: the model's input (``data.image.size`` / ``channels`` override them)."""

    def __init__(self, task: TaskSpec, cfg: DataConfig, size: int, channels: int, seed: int = 0):
        super().__init__(task, cfg, tokenizer=None, seed=seed, tokenizer_id="")
        self.size = cfg.image.size or size
        self.channels = cfg.image.channels or channels
        if cfg.image.size and cfg.image.size != size:
            raise config_error("data.image.size", cfg.image.size, f"the model's image_size ({size}) or null")
        if cfg.image.channels and cfg.image.channels != channels:
            raise config_error("data.image.channels", cfg.image.channels, f"the model's num_channels ({channels}) or null")
        self.collator = ImageCollator()
        self._generated: dict[str, list[dict]] | None = None

    def _load_rows(self, split: str) -> list[dict] | None:
        if self.cfg.source != "generated":
            raise config_error("data.source", self.cfg.source, f"one of {', '.join(self.task.sources)} for data.task={self.task.name!r}")
        if self._generated is None:
            self._generated = generate_image_rows(self.cfg, self.task.num_labels, self.size, self.channels)
        return self._generated.get(split)

    def _encode(self, split: str, rows: list[dict], content: str | None = None) -> ImageDataset:
        return ImageDataset({
            "pixel_values": [r["pixel_values"] for r in rows],
            "labels": [int(r["label"]) for r in rows],
            "idx": list(range(len(rows))),
        })  # fmt: skip
