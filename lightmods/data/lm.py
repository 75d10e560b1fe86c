"""Causal language modelling data (``data=lm/...``): documents from local text or jsonl files (the hub
otherwise), tokenised, joined with a separator token and cut into blocks of ``data.max_length`` tokens;
perplexity over every token of the evaluated split is the metric.

Rows are ``{"text", "idx", "label": None}``: one per non-empty line of a text file, one per object of a
jsonl file (``data.lm.text_field``), one per row of a hub split. A document longer than a block spills into
the next block, as in the usual "group texts" preparation; the training split drops its last partial block,
evaluated splits keep it (padded, the padding not scored), so every evaluated token counts once.
"""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from lightmods.data.readers import json_objects
from lightmods.data.tasks import TaskSpec
from lightmods.errors import ConfigError, DataError, config_error

log = logging.getLogger(__name__)
IGNORE = -100
TEXT_SUFFIXES = (".txt", ".raw", ".text")
JSONL_SUFFIXES = (".jsonl", ".json")


# ---------------------------------------------------------------- reading


def read_lm_file(path: Path, text_field: str) -> list[dict]:
    """Documents of one local file: non-empty lines of a text file, or ``text_field`` of each jsonl object."""
    suffix = path.suffix.lower()
    if suffix not in TEXT_SUFFIXES + JSONL_SUFFIXES:
        raise DataError(f"{path}: not a text ({', '.join(TEXT_SUFFIXES)}) or jsonl ({', '.join(JSONL_SUFFIXES)}) file")
    texts: list[str] = []
    if suffix in TEXT_SUFFIXES:
        with open(path, encoding="utf-8") as f:
            texts = [line.rstrip("\n") for line in f if line.strip()]
    else:
        for lineno, raw in json_objects(path):
            if text_field not in raw:
                raise DataError(f"{path}:{lineno}: no field {text_field!r} (data.lm.text_field); fields: {sorted(raw)}")
            if not isinstance(raw[text_field], str):
                raise DataError(f"{path}:{lineno}: field {text_field!r} is a {type(raw[text_field]).__name__}, expected text")
            if raw[text_field].strip():
                texts.append(raw[text_field])
    if not texts:
        raise DataError(f"{path}: no text in the file")
    return [{"text": t, "idx": i, "label": None} for i, t in enumerate(texts)]


def lm_file_names(task: TaskSpec, cfg, split: str) -> tuple[str, ...]:
    """File names looked for in ``data.data_dir``: ``data.lm.<split>_file`` when set, the task's defaults otherwise."""
    own = {"train": cfg.lm.train_file, "validation": cfg.lm.validation_file, "test": cfg.lm.test_file}.get(split)
    return (own,) if own else task.local_files.get(split, ())


def _first_file(root: Path, names: tuple[str, ...]) -> Path | None:
    return next((root / n for n in names if (root / n).is_file()), None)


def read_lm_local(task: TaskSpec, cfg, split: str) -> list[dict] | None:
    """Documents of ``split`` from ``data.data_dir``. Without a validation file (or when it is the training
    file) the training file's documents are split: a fixed ``data.lm.holdout`` share is validation."""
    root = Path(cfg.data_dir)
    train = _first_file(root, lm_file_names(task, cfg, "train"))
    val = _first_file(root, lm_file_names(task, cfg, "validation"))
    shared = train is not None and (val is None or val.resolve() == train.resolve())
    if split == "train":
        path, holdout = train, shared
    elif split == "validation":
        path, holdout = (val or train), shared
    else:
        path, holdout = _first_file(root, lm_file_names(task, cfg, split)), False
    if path is None:
        if split.startswith("test"):
            return None
        names = " or ".join(lm_file_names(task, cfg, split))
        raise ConfigError(f"data.data_dir={cfg.data_dir!r} has no {names} for the {split} split of {task.name} "
                          f"(set data.lm.{split}_file=<name> to read another file)")  # fmt: skip
    rows = read_lm_file(path, cfg.lm.text_field)
    if holdout:
        rows = holdout_documents(rows, cfg.lm.holdout, evaluation=split != "train")
        if not rows:
            raise DataError(f"{path}: too few documents to hold out a {split} share at data.lm.holdout={cfg.lm.holdout}")
    log.info("%s/%s: %d documents from %s%s", task.name, split, len(rows), path, " (held-out share)" if holdout else "")
    return rows


def holdout_documents(rows: list[dict], share: float, evaluation: bool) -> list[dict]:
    """The validation share (``evaluation=True``) or the rest of one file's documents, in file order. A
    document's side is decided by a hash of its text, so repeated documents never straddle the split and the
    split does not depend on the run's seed or on the file's order."""
    buckets = 10_000

    def held(text: str) -> bool:
        return int(hashlib.md5(text.encode("utf-8")).hexdigest(), 16) % buckets < share * buckets

    return [r for r in rows if held(r["text"]) == evaluation]


def read_lm_hub(task: TaskSpec, cfg, split: str) -> list[dict] | None:
    """Documents of a hub dataset split: the task's dataset, or ``data.lm.hub_path`` / ``hub_config``."""
    from datasets import load_dataset

    hub_path, hub_config = cfg.lm.hub_path or task.hub_path, cfg.lm.hub_config or task.hub_config
    if not hub_path:
        raise config_error("data.lm.hub_path", None, f"a hub dataset id for data.task={task.name!r} with data.source=hub "
                           "(or data.data_dir=<folder with text/jsonl files>)")  # fmt: skip
    hub_split = task.hub_splits.get(split, split if split in ("train", "validation", "test") else None)
    if hub_split is None:
        return None
    try:
        ds = load_dataset(hub_path, hub_config, split=hub_split)
    except Exception as e:  # noqa: BLE001 - offline, missing or renamed datasets all end here
        if split.startswith("test"):
            return None  # a dataset without a test split
        raise ConfigError(
            f"data.source='hub': {hub_path}/{hub_config} ({hub_split}) could not be loaded ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); accepted: a reachable hub or the local cache, or "
            f"data.data_dir=<folder with text or jsonl files>"
        ) from e
    field = cfg.lm.text_field
    if field not in ds.column_names:
        raise config_error("data.lm.text_field", field, f"a column of {hub_path}: {', '.join(ds.column_names)}")
    texts = [t for t in ds[field] if isinstance(t, str) and t.strip()]
    return [{"text": t, "idx": i, "label": None} for i, t in enumerate(texts)]


# ---------------------------------------------------------------- encoding


def separator_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token put between documents: EOS for decoder tokenizers, [SEP] for BERT-style ones."""
    for tid in (tokenizer.eos_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id):
        if tid is not None:
            return int(tid)
    raise ConfigError("model.tokenizer has no eos, sep or pad token to separate documents with")


def encode_lm(rows: list[dict], split: str, tokenizer: PreTrainedTokenizerBase, block: int) -> dict[str, list]:
    """Blocks of ``block`` tokens from the documents joined by the separator token. ``idx`` numbers the blocks."""
    ids = tokenizer([r["text"] for r in rows], add_special_tokens=False)["input_ids"]
    sep = separator_id(tokenizer)
    stream: list[int] = []
    for doc in ids:
        stream.extend(doc)
        stream.append(sep)
    stop = (len(stream) // block) * block if split == "train" else len(stream)
    blocks = [stream[i : i + block] for i in range(0, stop, block)]
    blocks = [b for b in blocks if len(b) > 1]  # a one-token block predicts nothing
    if not blocks:
        raise DataError(f"{split}: {len(stream)} tokens make no block of data.max_length={block} tokens")
    return {"input_ids": blocks, "labels": [list(b) for b in blocks], "idx": list(range(len(blocks)))}


class LMCollator:
    """Right-padding to the longest block; padded positions are masked and not scored (label -100)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else separator_id(tokenizer)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        n = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), n), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            k = len(r["input_ids"])
            ids[i, :k] = torch.tensor(r["input_ids"])
            labels[i, :k] = torch.tensor(r["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "idx": torch.tensor([r["idx"] for r in rows])}


# ---------------------------------------------------------------- loss and metric


def next_token_nll(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of each position's logits against the next token (labels shifted left by one)."""
    shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE, reduction=reduction)


class Perplexity(nn.Module):
    """``exp(total NLL / scored tokens)`` over a split: token-weighted, so batches and DDP shards of any size
    give the figure of the whole split (torchmetrics sums the two states across ranks)."""

    def __init__(self, task: TaskSpec, prefix: str = "val/", suffix: str = "", sync: bool = True):
        super().__init__()
        import torchmetrics

        self.prefix, self.suffix = prefix, suffix
        self.nll = torchmetrics.SumMetric(sync_on_compute=sync)
        self.tokens = torchmetrics.SumMetric(sync_on_compute=sync)

    def update_batch(self, logits: torch.Tensor, batch: dict) -> None:
        labels = batch["labels"]
        self.nll.update(next_token_nll(logits, labels, reduction="sum").double())
        self.tokens.update((labels[:, 1:] != IGNORE).sum().double())

    def compute(self) -> dict[str, float]:
        tokens = float(self.tokens.compute())
        nll = float(self.nll.compute()) / max(tokens, 1.0)
        return {f"{self.prefix}perplexity{self.suffix}": math.exp(min(nll, 700.0)), f"{self.prefix}nll{self.suffix}": nll}

    def reset(self) -> None:
        self.nll.reset()
        self.tokens.reset()
