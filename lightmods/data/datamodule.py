"""The DataModule for sentence and sentence-pair classification/regression tasks."""

from __future__ import annotations

import logging

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from lightmods.config.schema import DataConfig
from lightmods.data.demo import generate_demo
from lightmods.data.tasks import TaskSpec
from lightmods.errors import DataError, config_error

log = logging.getLogger(__name__)


class EncodedDataset(Dataset):
    """Tokenised rows (lists of ids) with their label and original index."""

    def __init__(self, features: dict[str, list]):
        self.features = features
        self.length = len(features["input_ids"])

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.features.items()}


class EpochSeededSampler(Sampler[int]):
    """A shuffle that depends only on (seed, epoch): a resumed run sees the same order as an uninterrupted one.
    Lightning calls ``set_epoch`` at the start of every epoch."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def load_raw_splits(task: TaskSpec, cfg: DataConfig) -> dict[str, list[dict]]:
    """Rows per split from the configured source."""
    if cfg.source not in task.sources:
        raise config_error("data.source", cfg.source, f"one of {', '.join(task.sources)} for data.task={task.name!r}")
    if task.name == "demo":
        return generate_demo(cfg.demo.num_train, cfg.demo.num_val, cfg.demo.seed)
    raise config_error("data.task", task.name, "a task with a loader")  # pragma: no cover


class TextClassificationDataModule(L.LightningDataModule):
    """Tokenises each split once, batches with dynamic padding, shuffles reproducibly."""

    def __init__(self, task: TaskSpec, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0):
        super().__init__()
        self.task, self.cfg, self.tokenizer, self.seed = task, cfg, tokenizer, seed
        self.raw: dict[str, list[dict]] = {}
        self.datasets: dict[str, EncodedDataset] = {}
        self.collator = DataCollatorWithPadding(tokenizer, return_tensors="pt")

    def _check_rows(self, split: str, rows: list[dict]) -> None:
        needed = (*self.task.text_fields, "label", "idx")
        for i, row in enumerate(rows):
            missing = [c for c in needed if c not in row]
            if missing:
                raise DataError(f"{self.task.name}/{split} row {i}: missing column(s) {missing}; expected {list(needed)}")
            if not self.task.is_regression and row["label"] not in range(self.task.num_labels):
                raise DataError(
                    f"{self.task.name}/{split} row {i}: label {row['label']!r} is not one of 0..{self.task.num_labels - 1} "
                    f"({', '.join(self.task.label_names)})"
                )

    def _encode(self, rows: list[dict]) -> EncodedDataset:
        texts = [[r[f] for r in rows] for f in self.task.text_fields]
        enc = self.tokenizer(*texts, truncation=True, max_length=self.cfg.max_length)
        features = {k: list(v) for k, v in enc.items()}
        dtype = float if self.task.is_regression else int
        features["labels"] = [dtype(r["label"]) for r in rows]
        features["idx"] = [int(r["idx"]) for r in rows]
        return EncodedDataset(features)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        raw = load_raw_splits(self.task, self.cfg)
        limits = {"train": self.cfg.max_train_samples, "validation": self.cfg.max_eval_samples}
        for split, rows in raw.items():
            if limits.get(split):
                rows = rows[: limits[split]]
            self._check_rows(split, rows)
            self.raw[split] = rows
            self.datasets[split] = self._encode(rows)
            log.info("%s/%s: %d examples", self.task.name, split, len(rows))

    def _collate(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        return self.collator(rows)

    def _generator(self) -> torch.Generator:
        """Loaders draw their workers' base seed from this, not from the global RNG, so creating an
        iterator does not shift the dropout masks (a resumed run then matches an uninterrupted one)."""
        return torch.Generator().manual_seed(self.seed)

    def train_dataloader(self) -> DataLoader:
        ds = self.datasets["train"]
        return DataLoader(
            ds,
            batch_size=self.cfg.batch_size,
            sampler=EpochSeededSampler(len(ds), self.seed),
            collate_fn=self._collate,
            num_workers=self.cfg.num_workers,
            persistent_workers=self.cfg.num_workers > 0,
            generator=self._generator(),
        )

    def eval_dataloader(self, split: str = "validation") -> DataLoader:
        return DataLoader(
            self.datasets[split],
            batch_size=self.cfg.eval_batch_size,
            shuffle=False,
            collate_fn=self._collate,
            num_workers=self.cfg.num_workers,
            generator=self._generator(),
        )

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("validation")
