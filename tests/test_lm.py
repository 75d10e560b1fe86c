"""Causal language modelling data (``data=lm/...``): reading, held-out split, blocks, perplexity, a run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lightmods.config import validate
from lightmods.data.lm import (
    LMCollator,
    Perplexity,
    encode_lm,
    holdout_documents,
    next_token_nll,
    read_lm_file,
)
from lightmods.data.tasks import get_task
from lightmods.errors import ConfigError, DataError
from lightmods.export import load_export
from lightmods.models import build_backbone, build_tokenizer
from lightmods.run import train
from tests.conftest import SHARED, compose_run

WORDS = "the cat sat on the mat and the dog ran to the park while birds sang in the tall green trees".split()


def write_corpus(folder: Path, n_train: int = 120, n_val: int = 20, test: bool = True) -> Path:
    """Sentences with a repeating structure, so a language model can learn them quickly."""
    folder.mkdir(parents=True, exist_ok=True)

    def line(i: int) -> str:
        k = i % 7
        return " ".join(WORDS[k : k + 9])

    (folder / "train.txt").write_text("\n".join(line(i) for i in range(n_train)) + "\n")
    (folder / "validation.txt").write_text("\n\n".join(line(i) for i in range(n_val)) + "\n")
    if test:
        (folder / "test.txt").write_text("\n".join(line(i + 3) for i in range(n_val)) + "\n")
    return folder


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    root = tmp_path_factory.mktemp("c")
    rc = validate(compose_run(["model=tiny_llama", "data=lm/text", f"data.data_dir={write_corpus(root)}"], root / "out"))
    return build_tokenizer(rc.model)


def test_text_and_jsonl_files_give_one_document_per_line_or_object(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\n  \nsecond line\n")
    assert [r["text"] for r in read_lm_file(tmp_path / "a.txt", "text")] == ["first line", "second line"]
    (tmp_path / "b.jsonl").write_text(json.dumps({"passage": "one"}) + "\n\n" + json.dumps({"passage": "two", "x": 1}) + "\n")
    rows = read_lm_file(tmp_path / "b.jsonl", "passage")
    assert [r["text"] for r in rows] == ["one", "two"] and [r["idx"] for r in rows] == [0, 1]


@pytest.mark.parametrize(
    "name, content, field, message",
    [
        ("a.jsonl", '{"text": "ok"}\n{"body": "no text field"}\n', "text", "a.jsonl:2: no field 'text'"),
        ("a.jsonl", '{"text": "ok"}\n{broken\n', "text", "a.jsonl:2: not valid JSON"),
        ("a.jsonl", '{"text": 3}\n', "text", "is a int, expected text"),
        ("a.csv", "text\nhello\n", "text", "not a text"),
        ("a.txt", "\n\n", "text", "no text in the file"),
    ],
)
def test_malformed_files_fail_naming_file_line_and_problem(tmp_path, name, content, field, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message.replace("(", r"\(")):
        read_lm_file(tmp_path / name, field)


def test_held_out_share_is_disjoint_stable_and_keeps_duplicates_together():
    rows = [{"text": f"document {i % 150}", "idx": i, "label": None} for i in range(400)]  # 250 repeats
    val = holdout_documents(rows, 0.1, evaluation=True)
    rest = holdout_documents(rows, 0.1, evaluation=False)
    assert len(val) + len(rest) == 400 and 0 < len(val) < 100
    assert not {r["text"] for r in val} & {r["text"] for r in rest}
    assert holdout_documents(list(reversed(rows)), 0.1, evaluation=True) == list(reversed(val))


def test_blocks_join_documents_with_the_separator_and_only_training_drops_the_tail(tokenizer):
    rows = [{"text": t, "idx": i, "label": None} for i, t in enumerate(["the cat sat", "on the mat today", "a dog"])]
    ids = tokenizer([r["text"] for r in rows], add_special_tokens=False)["input_ids"]
    sep = tokenizer.sep_token_id  # the BERT-style tokenizer has no EOS
    stream = [t for doc in ids for t in (*doc, sep)]
    train = encode_lm(rows, "train", tokenizer, 4)
    assert [t for b in train["input_ids"] for t in b] == stream[: len(stream) // 4 * 4]
    assert all(len(b) == 4 for b in train["input_ids"]) and train["labels"] == train["input_ids"]
    val = encode_lm(rows, "validation", tokenizer, 4)
    assert [t for b in val["input_ids"] for t in b] == stream
    batch = LMCollator(tokenizer)([{k: val[k][i] for k in val} for i in range(len(val["input_ids"]))])
    short = len(val["input_ids"][-1])
    assert batch["labels"][-1, short:].eq(-100).all() and batch["attention_mask"][-1, short:].eq(0).all()


def test_perplexity_is_token_weighted_and_matches_the_model_loss(tokenizer, tmp_path):
    rc = validate(compose_run(["model=tiny_llama", "method=full_ft"], tmp_path))
    model = build_backbone(rc.model, get_task("lm/text"), tokenizer).eval()
    torch.manual_seed(0)
    ids = torch.randint(5, 1000, (3, 9))
    labels = ids.clone()
    labels[2, 5:] = -100  # a padded tail
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        hf_loss = model(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(next_token_nll(logits, labels), hf_loss)
    metric = Perplexity(get_task("lm/text"), sync=False)
    metric.update_batch(logits[:1], {"labels": labels[:1]})  # batches of different sizes
    metric.update_batch(logits[1:], {"labels": labels[1:]})
    out = metric.compute()
    assert out["val/perplexity"] == pytest.approx(math.exp(float(hf_loss)), rel=1e-5)
    assert out["val/nll"] == pytest.approx(float(hf_loss), rel=1e-5)


def test_training_a_tiny_decoder_lowers_perplexity_and_the_export_reloads(run_cfg, tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    common = ["model=tiny_llama", "data=lm/text", f"data.data_dir={corpus}", "data.max_length=16", "data.batch_size=8"]
    untrained = train(run_cfg(*common, "method=full_ft", "train=false"))
    cfg = run_cfg(*common, "method=full_ft", "method.lr=1e-2", "trainer.max_epochs=4")
    metrics = train(cfg)
    out = Path(cfg.paths.output_dir)
    assert {"val/perplexity", "val/nll", "val/score", "test/perplexity", "test/nll", "test/score"} <= set(metrics)
    assert metrics["val/score"] == -metrics["val/perplexity"]
    assert metrics["val/perplexity"] < untrained["val/perplexity"] / 20  # ~vocabulary size -> a learnt corpus
    summary = json.loads((out / "summary.json").read_text())
    assert summary["flops_per_sample"] > 2 * 32 * 30522 * 8  # the LM head runs on every token
    assert not (out / "predictions" / "validation.jsonl").exists()
    model = load_export(out / "export")
    assert type(model).__name__ == "LlamaForCausalLM"
    ids = torch.randint(5, 1000, (2, 12))
    from lightmods.export import load_checkpoint_model

    trained = load_checkpoint_model(out / "checkpoints" / "last.ckpt").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, trained(input_ids=ids).logits)


def test_one_file_is_split_into_training_and_validation_documents(run_cfg, tmp_path):
    folder = tmp_path / "one"
    folder.mkdir()
    (folder / "docs.jsonl").write_text("".join(json.dumps({"body": f"text number {i} of the corpus"}) + "\n" for i in range(60)))
    cfg = run_cfg("model=tiny_llama", "data=lm/text", f"data.data_dir={folder}", "data.lm.train_file=docs.jsonl",
                  "data.lm.text_field=body", "data.max_length=8", "trainer.fast_dev_run=1")  # fmt: skip
    metrics = train(cfg)
    assert math.isfinite(metrics["val/perplexity"]) and "test/perplexity" not in metrics


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model=tiny"], "model=.*bert.*decoder-only model"),
        (["data.lm.holdout=1.5"], "data.lm.holdout=1.5"),
        (["data.lm.train_file=missing.txt"], "has no missing.txt for the train split"),
    ],
)
def test_bad_lm_configs_fail_before_training(run_cfg, tmp_path, overrides, message):
    corpus = write_corpus(tmp_path / "c")
    cfg = run_cfg("model=tiny_llama", "data=lm/text", f"data.data_dir={corpus}", *overrides)
    with pytest.raises(ConfigError, match=message):
        train(cfg)
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()


def test_hub_source_without_a_dataset_names_the_key(run_cfg):
    cfg = run_cfg("model=tiny_llama", "data=lm/text", "data.source=hub")
    with pytest.raises(ConfigError, match="data.lm.hub_path"):
        train(cfg)


def test_wikitext_reads_the_original_raw_files(run_cfg, tmp_path):
    folder = tmp_path / "wiki"
    folder.mkdir()
    for split in ("train", "valid", "test"):
        (folder / f"wiki.{split}.raw").write_text(" = Title = \n\n the cat sat on the mat . \n the dog ran . \n" * 5)
    metrics = train(run_cfg("model=tiny_llama", "data=lm/wikitext2", f"data.data_dir={folder}", "data.max_length=8", "trainer.fast_dev_run=1"))
    assert {"val/perplexity", "test/perplexity"} <= set(metrics)


def test_shared_boolq_passages_make_a_corpus(tmp_path):
    folder = SHARED / "data" / "superglue" / "BoolQ"
    if not folder.is_dir():
        pytest.skip("../shared/data is not beside the repository")
    rc = validate(compose_run(["model=tiny_llama", "data=lm/text", f"data.data_dir={folder}",
                               "data.lm.train_file=val.jsonl", "data.lm.text_field=passage"], tmp_path))  # fmt: skip
    from lightmods.data.lm import read_lm_local

    train_rows = read_lm_local(get_task("lm/text"), rc.data, "train")
    val_rows = read_lm_local(get_task("lm/text"), rc.data, "validation")
    assert len(train_rows) > 2500 and 250 < len(val_rows) < 450
    assert not {r["text"] for r in train_rows} & {r["text"] for r in val_rows}
