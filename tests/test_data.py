"""The embedded demo task and the DataModule."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from lightmods.config import validate
from lightmods.data import TextClassificationDataModule, get_task
from lightmods.data.datamodule import EpochSeededSampler
from lightmods.data.demo import generate_demo
from lightmods.errors import DataError
from lightmods.models import build_tokenizer
from tests.conftest import compose_run


def test_demo_is_deterministic_disjoint_balanced_and_varied():
    a = generate_demo(3000, 600, seed=1234)
    assert a == generate_demo(3000, 600, seed=1234)
    assert a != generate_demo(3000, 600, seed=1)
    train_text = {r["sentence"] for r in a["train"]}
    assert len(train_text) == 3000 and not train_text & {r["sentence"] for r in a["validation"]}
    counts = Counter(r["label"] for r in a["train"])
    assert 0.45 < counts[1] / 3000 < 0.55
    # the sentiment words alone do not decide: negated and contrastive sentences are common
    assert sum(" not " in r["sentence"] or " never " in r["sentence"] for r in a["train"]) > 300
    assert sum(" but " in r["sentence"] or "although" in r["sentence"] for r in a["train"]) > 300


def test_negation_and_contrast_labels():
    rows = generate_demo(2000, 10, seed=3)["train"]
    for r in rows:
        s = r["sentence"]
        if s.endswith("recommend " + s.split("recommend ")[-1]) and "recommend" in s:
            assert r["label"] == int("definitely" in s)


def make_dm(tmp_path, *overrides):
    rc = validate(compose_run(["model=tiny", *overrides], tmp_path))
    return TextClassificationDataModule(get_task("demo"), rc.data, build_tokenizer(rc.model), seed=0)


def test_datamodule_batches_with_dynamic_padding(tmp_path):
    dm = make_dm(tmp_path, "data.max_train_samples=40", "data.batch_size=8")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 8
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    longest = int(batch["attention_mask"].sum(1).max())
    assert batch["input_ids"].shape[1] == longest  # padded to the batch's longest, not to max_length
    assert batch["labels"].dtype == torch.long and "idx" in batch
    assert len(dm.datasets["train"]) == 40


def test_tokenisation_cache_survives_a_concurrent_writer(tmp_path, monkeypatch):
    """Runs started together (parallel sweep jobs, benchmarks) encode the same split into the same cache file:
    a writer must not lose its temporary file to another's rename."""
    dm = make_dm(tmp_path, "data.max_train_samples=40", "data.cache=true", f"data.cache_dir={tmp_path / 'cache'}")
    save = torch.save

    def save_while_another_run_finishes(obj, f, *a, **kw):
        save(obj, f, *a, **kw)
        final = Path(f).parent / (Path(f).name.lstrip(".").split(".")[0] + ".pt")  # where the other run's copy goes
        other = final.with_suffix(".tmp")  # a fixed temporary name would be this one, shared
        save(obj, other)
        other.replace(final)

    monkeypatch.setattr(torch, "save", save_while_another_run_finishes)
    dm.setup("fit")
    cached = list((tmp_path / "cache" / "tokenized").iterdir())
    assert cached and all(p.suffix == ".pt" and not p.name.startswith(".") for p in cached), cached  # no stray temporary
    monkeypatch.setattr(torch, "save", save)
    again = make_dm(tmp_path, "data.max_train_samples=40", "data.cache=true", f"data.cache_dir={tmp_path / 'cache'}")
    again.setup("fit")
    assert again.datasets["train"][0] == dm.datasets["train"][0]


def test_sampler_depends_only_on_seed_and_epoch():
    s = EpochSeededSampler(50, seed=3)
    first = list(s)
    assert list(s) == first
    s.set_epoch(1)
    assert list(s) != first and sorted(s) == list(range(50))
    s.set_epoch(0)
    assert list(s) == first


def test_rows_with_missing_columns_or_bad_labels_are_rejected(tmp_path):
    dm = make_dm(tmp_path)
    with pytest.raises(DataError, match=r"demo/train row 1: missing column\(s\) \['sentence'\]"):
        dm._check_rows("train", [{"idx": 0, "sentence": "ok", "label": 1}, {"idx": 1, "label": 0}])
    with pytest.raises(DataError, match=r"row 0: label 7 is not one of 0..1"):
        dm._check_rows("train", [{"idx": 0, "sentence": "ok", "label": 7}])
