"""Backbones: offline MiniLM from its package, random-init architectures, clear errors for unreachable hub ids."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForSequenceClassification

from lightmods.config import validate
from lightmods.data.tasks import get_task
from lightmods.errors import ConfigError
from lightmods.models import build_backbone, build_tokenizer, family_of, resolve_path
from tests.conftest import compose_run


@pytest.mark.slow
def test_minilm_loads_pretrained_weights_offline(tmp_path):
    rc = validate(compose_run(["model=minilm"], tmp_path))
    path = resolve_path(rc.model.name_or_path)
    tok = build_tokenizer(rc.model)
    model = build_backbone(rc.model, get_task("demo"), tok)
    assert family_of(model).name == "bert"
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    assert 22_000_000 < sum(p.numel() for p in model.parameters()) < 23_500_000
    shipped = load_file(f"{path}/model.safetensors")
    key = next(k for k in shipped if k.endswith("word_embeddings.weight"))
    torch.testing.assert_close(model.bert.embeddings.word_embeddings.weight, shipped[key])
    assert tok("hello world")["input_ids"][0] == tok.cls_token_id


@pytest.mark.parametrize("option", ["bert_base", "roberta_base", "roberta_large"])
def test_hub_models_build_randomly_from_their_arch_without_download(option, tmp_path):
    """The real-size architecture each hub option names, built on the meta device (no memory, no download)."""
    rc = validate(compose_run([f"model={option}"], tmp_path))
    arch = dict(rc.model.arch)
    config = AutoConfig.for_model(arch.pop("model_type"), **arch, num_labels=2)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    n = sum(p.numel() for p in model.parameters())
    expected = {"bert_base": 109e6, "roberta_base": 124e6, "roberta_large": 355e6}[option]
    assert abs(n - expected) / expected < 0.02, n
    assert family_of(model).name in ("bert", "roberta")


def test_unreachable_hub_id_fails_with_key_and_value(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = validate(compose_run(["model=roberta_base", "model.name_or_path=nobody/not-a-model-xyz"], tmp_path))
    with pytest.raises(ConfigError, match=r"model.name_or_path='nobody/not-a-model-xyz' could not be loaded.*Accepted"):
        build_tokenizer(rc.model)


def test_missing_package_fails_clearly():
    with pytest.raises(ConfigError, match="package 'no_such_pkg_abc' is not installed"):
        resolve_path("pkg:no_such_pkg_abc")


def test_tiny_llama_pads_and_classifies(tmp_path):
    rc = validate(compose_run(["model=tiny_llama"], tmp_path))
    tok = build_tokenizer(rc.model)
    model = build_backbone(rc.model, get_task("demo"), tok)
    assert model.config.pad_token_id == tok.pad_token_id
    batch = tok(["short", "a much longer sentence here"], padding=True, return_tensors="pt")
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.shape == (2, 2)
    assert family_of(model).name == "llama"
