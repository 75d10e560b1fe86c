"""Unlabelled span rows for distillation (``data.augment``) and the label loss that ignores them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightmods.config import validate
from lightmods.config.schema import AugmentDataConfig
from lightmods.data.augment import span_rows
from lightmods.data.tasks import get_task
from lightmods.errors import ConfigError
from lightmods.losses.labelled import labelled_cross_entropy
from tests.conftest import compose_run

SST2 = get_task("glue/sst2")
ROWS = [
    {"sentence": "a stirring , funny and finally transporting film", "label": 1, "idx": 0},
    {"sentence": "too long", "label": 0, "idx": 1},  # no span of 3 words fits in 2 - 1 words
    {"sentence": "the plot is nothing but boilerplate clichés from start to finish", "label": 0, "idx": 2},
]


def test_spans_are_unlabelled_contiguous_distinct_and_seeded():
    cfg = AugmentDataConfig(spans=4, min_words=3)
    spans = span_rows(ROWS, SST2, cfg, seed=7)
    assert len(spans) == 8  # 4 for each sentence long enough, none for "too long"
    assert [r["idx"] for r in spans] == list(range(3, 11))
    for parent, chunk in ((ROWS[0], spans[:4]), (ROWS[2], spans[4:])):
        words = parent["sentence"].split()
        texts = [r["sentence"] for r in chunk]
        assert len(set(texts)) == 4
        for r in chunk:
            assert r["label"] is None
            n = len(r["sentence"].split())
            assert 3 <= n <= len(words) - 1
            assert f" {r['sentence']} " in f" {' '.join(words)} "  # a contiguous run of whole words
    assert span_rows(ROWS, SST2, cfg, seed=7) == spans
    assert span_rows(ROWS, SST2, cfg, seed=8) != spans


def test_short_sentences_give_what_spans_they_have():
    row = {"sentence": "one two three four", "label": 1, "idx": 0}  # spans of 2-3 words: 3 + 2 of them
    spans = span_rows([row], SST2, AugmentDataConfig(spans=10, min_words=2), seed=0)
    assert sorted(r["sentence"] for r in spans) == sorted(
        ["one two", "two three", "three four", "one two three", "two three four"]
    )


def test_labelled_cross_entropy_ignores_unlabelled_rows_and_never_gives_nan():
    logits = torch.randn(6, 3, requires_grad=True)
    labels = torch.tensor([0, 2, -100, 1, -100, 2])
    keep = labels != -100
    assert torch.allclose(labelled_cross_entropy(logits, labels), F.cross_entropy(logits[keep], labels[keep]))
    full = torch.tensor([0, 2, 1, 1, 0, 2])
    assert torch.equal(labelled_cross_entropy(logits, full), F.cross_entropy(logits, full))
    none = labelled_cross_entropy(logits, torch.full((6,), -100))
    assert none.item() == 0.0 and not torch.isnan(F.cross_entropy(logits, full))
    none.backward()  # part of the graph: a batch of span rows alone still steps
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize(
    ("overrides", "accepted"),
    [
        (["method=full_ft", "data.augment.spans=2"], "distils from a teacher"),
        (["method=cost_eff", "method.teacher=x", "data=glue/rte", "data.augment.spans=2"], "single-sentence"),
        (["method=cost_eff", "method.teacher=x", "attack=badnets", "data.augment.spans=2"], "clean training rows"),
        (["data.augment.spans=-1"], "data.augment.spans"),
        (["data.augment.min_words=0"], "data.augment.min_words"),
    ],
)
def test_bad_augment_settings_fail_naming_the_key(tmp_path, overrides, accepted):
    with pytest.raises(ConfigError, match="data.augment") as e:
        validate(compose_run(overrides, tmp_path))
    assert accepted in str(e.value)
