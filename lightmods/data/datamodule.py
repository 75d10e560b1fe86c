"""The DataModule for classification, regression and multiple-choice tasks: rows from the configured
source, checked, tokenised once (cached on disk), batched with dynamic padding, shuffled reproducibly."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from lightmods.config.schema import DataConfig
from lightmods.data.builders import encode
from lightmods.data.demo import generate_demo
from lightmods.data.readers import local_file, read_hub_split, read_local_split
from lightmods.data.tasks import TaskSpec
from lightmods.errors import DataError, config_error

log = logging.getLogger(__name__)
CACHE_VERSION = 1  # bump when builders change what they produce
EXTRA_KEYS = ("labels", "idx", "group", "offset_mapping", "example_id", "start_positions", "end_positions", "candidate", "poisoned", "suspect")


def _files_stat(folder: str | None) -> list:
    """Name, size and modification time of each file in ``folder``: a cache key that changes with the files."""
    if not folder or not Path(folder).is_dir():
        return []
    return sorted([p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in Path(folder).iterdir() if p.is_file())


class EncodedDataset(Dataset):
    """Tokenised rows (lists of ids) with their label and row position."""

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


class UnpaddedShardSampler(DistributedSampler):
    """Validation under DDP: rank r takes rows r, r + world, ... with no padding, so every row is scored
    exactly once when torchmetrics gathers the ranks' states (Lightning's default sampler repeats rows to
    even out the shards). Lightning keeps a sampler that already is a DistributedSampler."""

    def __init__(self, dataset: Dataset):
        super().__init__(dataset, shuffle=False, drop_last=False)

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))


class Collator:
    """Dynamic padding; multiple-choice features are flattened to ``(batch * choices, length)``."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, regression: bool):
        self.pad = DataCollatorWithPadding(tokenizer, return_tensors="pt")
        self.regression = regression

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        model_rows = [{k: v for k, v in r.items() if k not in EXTRA_KEYS} for r in rows]
        if isinstance(rows[0]["input_ids"][0], list):  # multiple choice
            model_rows = [{k: r[k][c] for k in r} for r in model_rows for c in range(len(r["input_ids"]))]
        batch = dict(self.pad(model_rows))
        batch["labels"] = torch.tensor([r["labels"] for r in rows], dtype=torch.float if self.regression else torch.long)
        for key in ("idx", "group", "poisoned", "suspect"):
            if key in rows[0]:
                batch[key] = torch.tensor([r[key] for r in rows], dtype=torch.long)
        return batch


class TextClassificationDataModule(L.LightningDataModule):
    """Splits: ``train``, the task's evaluation splits, and any test splits the source has.

    With an ``attack`` (a :class:`lightmods.attacks.poison.Poisoner`), the training rows are poisoned after
    ``max_train_samples`` cuts them (each row flagged ``poisoned`` in the batches), and the poisoned evaluation
    split is added after the task's own; both are cached under a key that includes their content. A
    ``train_flagger`` (a defense's isolation, :class:`lightmods.attacks.isolation.LexicalIsolation`) flags the
    training rows it suspects from their features (``suspect`` in the batches), again when the training rows change.
    """

    def __init__(self, task: TaskSpec, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0, tokenizer_id: str = "",
                 attack=None, train_flagger=None):  # fmt: skip
        super().__init__()
        self.task, self.cfg, self.tokenizer, self.seed = task, cfg, tokenizer, seed
        self.attack, self.train_flagger = attack, train_flagger
        self.clean_train_rows: list[dict] | None = None
        self.tokenizer_id = tokenizer_id or getattr(tokenizer, "name_or_path", "")
        self.raw: dict[str, list[dict]] = {}
        self.datasets: dict[str, EncodedDataset] = {}
        if task.head == "causal_lm":
            from lightmods.data.lm import LMCollator

            self.collator = LMCollator(tokenizer)
        else:
            self.collator = Collator(tokenizer, task.is_regression)
        # A method's own composition of training batches (GS-LoRA: retained + forgotten rows per step):
        # ``train_batch_sampler(dataset)`` -> a batch sampler; None = shuffled batches of ``batch_size``.
        self.train_batch_sampler = None

    # ------------------------------------------------------------ loading
    @property
    def eval_splits(self) -> list[str]:
        return list(self.task.eval_splits) + ([self.attack_split] if self.attack is not None else [])

    @property
    def attack_split(self) -> str:
        from lightmods.attacks.poison import POISONED_SPLIT

        return POISONED_SPLIT

    @property
    def test_splits(self) -> list[str]:
        return [s for s in self.datasets if s.startswith("test")]

    def labelled(self, split: str) -> bool:
        return any(r.get("label") is not None for r in self.raw.get(split, ()))

    def _source_key(self, split: str) -> dict:
        cfg = self.cfg
        if cfg.source == "generated":
            return {"demo": [cfg.demo.num_train, cfg.demo.num_val, cfg.demo.seed]}
        if self.task.head == "causal_lm":  # which files and field, and the share held out
            return {"lm": [cfg.source, cfg.data_dir and str(Path(cfg.data_dir).resolve()), _files_stat(cfg.data_dir),
                           cfg.lm.train_file, cfg.lm.validation_file, cfg.lm.test_file, cfg.lm.text_field, cfg.lm.holdout,
                           cfg.lm.hub_path or self.task.hub_path, cfg.lm.hub_config or self.task.hub_config]}  # fmt: skip
        if cfg.source == "local":
            path = local_file(self._split_task(split), cfg.data_dir, split)
            stat = path.stat() if path else None
            return {"file": str(path.resolve()) if path else None, "size": stat.st_size if stat else None, "mtime": stat.st_mtime_ns if stat else None}
        return {"hub": [self.task.hub_path, self.task.hub_config]}

    def _split_task(self, split: str) -> TaskSpec:
        """A diagnostic task reads its base task's train/validation files and its own test file."""
        from lightmods.data.tasks import get_task

        return get_task(self.task.base) if self.task.base and not split.startswith("test") else self.task

    def _load_rows(self, split: str) -> list[dict] | None:
        cfg, task = self.cfg, self._split_task(split)
        if cfg.source not in task.sources:
            raise config_error("data.source", cfg.source, f"one of {', '.join(task.sources)} for data.task={task.name!r}")
        if cfg.source == "generated":
            return generate_demo(cfg.demo.num_train, cfg.demo.num_val, cfg.demo.seed).get(split)
        if task.head == "causal_lm":
            from lightmods.data.lm import read_lm_hub, read_lm_local

            return read_lm_local(task, cfg, split) if cfg.source == "local" else read_lm_hub(task, cfg, split)
        if cfg.source == "local":
            return read_local_split(task, cfg.data_dir, split)
        return read_hub_split(task, split)

    def _check_rows(self, split: str, rows: list[dict]) -> None:
        """Columns present, labels in range; a diagnostic test file with labels is scored, so it is checked too."""
        if self.task.head == "qa" or self.task.builder == "record":  # answers, not labels
            needed = ("id", "question", "context", "answers") if self.task.head == "qa" else ("passage", "query", "entities", "answers")
            for i, row in enumerate(rows):
                missing = [c for c in needed if c not in row]
                if missing:
                    raise DataError(f"{self.task.name}/{split} row {i}: missing column(s) {missing}; expected {list(needed)}")
            return
        if self.task.head == "causal_lm":  # documents: text only
            for i, row in enumerate(rows):
                if not isinstance(row.get("text"), str):
                    raise DataError(f"{self.task.name}/{split} row {i}: no text")
            return
        needed = (*self.task.text_fields, "label", "idx")
        labelled = not split.startswith("test")
        if self.task.base and split.startswith("test") and rows and rows[0].get("label") is not None:
            labelled = True
        for i, row in enumerate(rows):
            missing = [c for c in needed if c not in row]
            if missing:
                raise DataError(f"{self.task.name}/{split} row {i}: missing column(s) {missing}; expected {list(needed)}")
            label = row["label"]
            if label is None:
                if labelled:
                    raise DataError(f"{self.task.name}/{split} row {i}: no label in a labelled split")
                continue
            if not self.task.is_regression and label not in range(self.task.num_labels):
                raise DataError(
                    f"{self.task.name}/{split} row {i}: label {label!r} is not one of 0..{self.task.num_labels - 1} "
                    f"({', '.join(self.task.label_names)})"
                )

    def _cache_path(self, split: str, n_rows: int, content: str | None = None) -> Path:
        key = {
            "v": CACHE_VERSION, "task": self.task.name, "split": split, "source": self._source_key(split),
            "tokenizer": [self.tokenizer_id, type(self.tokenizer).__name__, len(self.tokenizer)],
            "max_length": self.cfg.max_length, "rows": n_rows,
        }  # fmt: skip
        if content is not None:  # rows changed after loading (poisoned): keyed on what they hold
            key["content"] = content
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
        root = Path(self.cfg.cache_dir).expanduser() if self.cfg.cache_dir else Path.home() / ".cache" / "lightmods"
        return root / "tokenized" / f"{self.task.name.replace('/', '_')}-{split}-{digest}.pt"

    def _encode(self, split: str, rows: list[dict], content: str | None = None) -> EncodedDataset:
        path = self._cache_path(split, len(rows), content) if self.cfg.cache else None
        if path is not None and path.exists():
            log.info("%s/%s: tokenised features from cache %s", self.task.name, split, path)
            return EncodedDataset(torch.load(path, weights_only=True))
        if self.task.head == "qa":
            features = self._encode_qa(split, rows)
        elif self.task.head == "causal_lm":
            from lightmods.data.lm import encode_lm

            features = encode_lm(rows, split, self.tokenizer, self.cfg.max_length)
        else:
            features = encode(self.task, rows, split, self.tokenizer, self.cfg.max_length)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            # the cache is shared by concurrent runs (parallel sweep jobs, benchmarks): each writer has its own
            # temporary file, and the last rename wins with identical content
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            torch.save(features, tmp)
            tmp.replace(path)
        return EncodedDataset(features)

    def _encode_qa(self, split: str, rows: list[dict]) -> dict[str, list]:
        """Sliding windows; training windows are labelled with answer positions, evaluation windows keep
        their offsets for decoding answers."""
        from lightmods.data.qa import prepare_eval_features, prepare_train_features

        if split == "train":
            f = prepare_train_features(rows, self.tokenizer, self.cfg.max_length, self.cfg.doc_stride)
            f["labels"] = [[s, e] for s, e in zip(f.pop("start_positions"), f.pop("end_positions"))]
        else:
            f = prepare_eval_features(rows, self.tokenizer, self.cfg.max_length, self.cfg.doc_stride)
            f["labels"] = [[-100, -100]] * len(f["input_ids"])
        f["idx"] = list(range(len(f["input_ids"])))
        return f

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        splits = ["train", *self.task.eval_splits, *(s for s in self.task.local_files if s.startswith("test"))]
        if self.cfg.source == "hub":
            splits += [s for s in self.task.hub_splits if s.startswith("test") and s not in splits]
        limits = {"train": self.cfg.max_train_samples}
        for split in dict.fromkeys(splits):
            rows = self._load_rows(split)
            if rows is None:
                continue
            limit = limits.get(split, self.cfg.max_eval_samples)
            if limit:
                rows = rows[:limit]
            self._check_rows(split, rows)
            if self.attack is not None and split == "train":
                self.clean_train_rows = rows
                self._add_poisoned(split, self.attack.poison_train(rows))
                continue
            if split == "train" and self.cfg.augment.spans:
                self._add_spans(rows)
                continue
            self.raw[split] = rows
            self.datasets[split] = self._encode(split, rows)
            log.info("%s/%s: %d rows, %d features", self.task.name, split, len(rows), len(self.datasets[split]))
        if self.attack is not None:
            clean = self.raw[next(iter(self.task.eval_splits))]
            self._add_poisoned(self.attack_split, self.attack.eval_rows(clean, self.cfg.max_eval_samples))
        self._flag_train()

    def _flag_train(self) -> None:
        if self.train_flagger is not None and "train" in self.datasets:
            features = self.datasets["train"].features
            features["suspect"] = self.train_flagger(features)

    def _add_spans(self, rows: list[dict]) -> None:
        """The training rows and their unlabelled span rows (``data.augment``), content-keyed in the cache."""
        from lightmods.attacks.poison import rows_digest
        from lightmods.data.augment import span_rows

        spans = span_rows(rows, self.task, self.cfg.augment, self.seed)
        rows = rows + spans
        self.raw["train"] = rows
        self.datasets["train"] = self._encode("train", rows, content=rows_digest(rows, self.task.text_fields))
        log.info("%s/train: %d rows + %d unlabelled span rows (data.augment.spans=%d), %d features", self.task.name,
                 len(rows) - len(spans), len(spans), self.cfg.augment.spans, len(self.datasets["train"]))  # fmt: skip

    def _add_poisoned(self, split: str, rows: list[dict]) -> None:
        """A split the attack made: content-keyed in the cache, rows flagged ``poisoned`` in the batches."""
        from lightmods.attacks.poison import rows_digest

        self._check_rows(split, rows)
        self.raw[split] = rows
        self.datasets[split] = self._encode(split, rows, content=rows_digest(rows, self.task.text_fields))
        self.datasets[split].features["poisoned"] = [int(bool(r.get("poisoned"))) for r in rows]
        log.info("%s/%s: %d rows (%d poisoned), %d features", self.task.name, split, len(rows),
                 sum(self.datasets[split].features["poisoned"]), len(self.datasets[split]))  # fmt: skip

    def use_clean_train(self) -> None:
        """Train on the training rows as they were before poisoning (the user's clean fine-tuning stage)."""
        if self.clean_train_rows is None:
            raise RuntimeError("use_clean_train() needs an attack and setup() first")
        self.raw["train"] = self.clean_train_rows
        self.datasets["train"] = self._encode("train", self.clean_train_rows)
        self._flag_train()

    # ------------------------------------------------------------ loaders
    def _generator(self) -> torch.Generator:
        """Loaders draw their workers' base seed from this, not from the global RNG, so creating an
        iterator does not shift the dropout masks (a resumed run then matches an uninterrupted one)."""
        return torch.Generator().manual_seed(self.seed)

    def train_dataloader(self) -> DataLoader:
        ds = self.datasets["train"]
        if self.train_batch_sampler is not None:
            return DataLoader(
                ds, batch_sampler=self.train_batch_sampler(ds), collate_fn=self.collator, num_workers=self.cfg.num_workers,
                persistent_workers=self.cfg.num_workers > 0, generator=self._generator(),
            )  # fmt: skip
        return DataLoader(
            ds,
            batch_size=self.cfg.batch_size,
            sampler=EpochSeededSampler(len(ds), self.seed),
            collate_fn=self.collator,
            num_workers=self.cfg.num_workers,
            persistent_workers=self.cfg.num_workers > 0,
            generator=self._generator(),
        )

    def eval_dataloader(self, split: str = "validation", shard: bool = False) -> DataLoader:
        """All rows of a split in order; ``shard=True`` under DDP gives this rank's unpadded share."""
        ds = self.datasets[split]
        sharded = shard and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        return DataLoader(
            ds,
            batch_size=self.cfg.eval_batch_size,
            sampler=UnpaddedShardSampler(ds) if sharded else None,
            shuffle=False,
            collate_fn=self.collator,
            num_workers=self.cfg.num_workers,
            generator=self._generator(),
        )

    def val_dataloader(self) -> list[DataLoader]:
        return [self.eval_dataloader(s, shard=True) for s in self.eval_splits]
