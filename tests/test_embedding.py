"""The word embedding's slenderization parts: the (weighted) low-rank factorisation and vocabulary trimming, on
their own and through a pruning plan (what a resumed run and an export reload rebuild)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightmods.structure import PruningPlan
from lightmods.structure.embedding import (
    FactorizedEmbedding,
    TrimmedEmbedding,
    embedding_rank,
    embedding_vocab,
    factorize_embedding,
    kept_token_ids,
    low_rank_factors,
    nearest_kept_ids,
    trim_vocabulary,
)
from lightmods.structure.plan import apply_plan

V, H = 40, 12
KEPT = [0, 1, 3, 7, 8, 20, 33]  # 0: padding, 1: the fallback ([UNK])


class Tiny(nn.Module):
    """The attribute path of an encoder's word embedding, nothing else."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(V, H, padding_idx=0)

    def forward(self, ids):
        return self.embeddings.word_embeddings(ids)


def test_trimmed_embedding_keeps_rows_and_sends_the_rest_to_the_fallback():
    model = Tiny()
    original = model.embeddings.word_embeddings.weight.detach().clone()
    trim_vocabulary(model, KEPT, 1)
    emb = model.embeddings.word_embeddings
    assert isinstance(emb, TrimmedEmbedding) and emb.num_embeddings == V and embedding_vocab(model) == len(KEPT)
    assert emb.padding_idx == 0 and emb.inner.padding_idx == 0
    ids = torch.arange(V)
    expected = torch.where(torch.isin(ids, torch.tensor(KEPT)), ids, torch.tensor(1))
    torch.testing.assert_close(model(ids), original[expected], rtol=0, atol=0)
    assert sum(p.numel() for p in model.parameters()) == len(KEPT) * H  # the map is a buffer, not a parameter
    trim_vocabulary(model, KEPT, 1)  # the same vocabulary again: a no-op
    assert model.embeddings.word_embeddings is emb
    with pytest.raises(ValueError, match="already trimmed"):
        trim_vocabulary(model, KEPT[:-1], 1)
    with pytest.raises(ValueError, match="fallback token id 2"):
        trim_vocabulary(Tiny(), KEPT, 2)


def test_factorising_a_trimmed_embedding_spends_the_rank_on_the_kept_rows():
    """Weighted SVD after trimming = weighted SVD of the kept rows with their own weights; trimming after the
    factorisation keeps the factor rows; both give the same architecture (what a plan rebuilds)."""
    weights = torch.arange(1, V + 1).double()
    a = Tiny()
    kept_rows = nn.Embedding.from_pretrained(a.embeddings.word_embeddings.weight[KEPT].detach().clone())
    e1, e2 = low_rank_factors(kept_rows, 4, weights[KEPT])
    trim_vocabulary(a, KEPT, 1)
    factorize_embedding(a, 4, weights)
    assert embedding_rank(a) == 4 and isinstance(a.embeddings.word_embeddings.inner, FactorizedEmbedding)
    torch.testing.assert_close(a(torch.tensor(KEPT)), e1 @ e2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a(torch.tensor([2, 39])), (e1 @ e2)[[1, 1]], rtol=1e-5, atol=1e-6)
    assert sum(p.numel() for p in a.parameters()) == 4 * (len(KEPT) + H)

    b = Tiny()
    factorize_embedding(b, 4)
    full = b(torch.tensor(KEPT)).detach()
    trim_vocabulary(b, KEPT, 1)
    torch.testing.assert_close(b(torch.tensor(KEPT)), full, rtol=0, atol=0)
    assert set(b.state_dict()) == set(a.state_dict()) == {
        "embeddings.word_embeddings.kept_ids",
        "embeddings.word_embeddings.inner.embed.weight",
        "embeddings.word_embeddings.inner.proj.weight",
    }


def tiny_bert(seed: int) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=V, hidden_size=H, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    return BertForSequenceClassification(cfg).eval()


def test_a_plan_with_a_kept_vocabulary_rebuilds_and_reloads_the_trimmed_model():
    trained = tiny_bert(0)
    trim_vocabulary(trained, KEPT, 1)
    factorize_embedding(trained, 5, torch.ones(V))
    plan = PruningPlan.from_dict(
        PruningPlan(embedding_rank=5, embedding_vocab=KEPT, embedding_fallback=1).to_dict()
    )
    assert plan.embedding_vocab == KEPT and plan.embedding_fallback == 1
    fresh = apply_plan(tiny_bert(1), plan)
    fresh.load_state_dict(trained.state_dict())
    ids = torch.randint(0, V, (3, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fresh(ids).logits, trained(ids).logits, rtol=0, atol=0)
    # composition: the vocabulary is absolute token ids; a later plan without one keeps it
    later = plan.then(PruningPlan(embedding_rank=3))
    assert later.embedding_rank == 3 and later.embedding_vocab == KEPT and later.embedding_fallback == 1
    assert "embedding_vocab" not in PruningPlan(embedding_rank=3).to_dict()  # older plans read as before


def test_kept_token_ids_are_the_used_and_the_special_ones():
    assert kept_token_ids([[2, 5, 5], [9, 2]], {0, 1}, 12).tolist() == [0, 1, 2, 5, 9]
    # min_count: a token seen fewer times loses its row (special tokens always keep theirs)
    assert kept_token_ids([[2, 5, 5], [9, 2, 1]], {0, 1}, 12, min_count=2).tolist() == [0, 1, 2, 5]
    assert kept_token_ids([[2, 5, 5], [9, 2]], {0}, 12, min_count=3).tolist() == [0]
    with pytest.raises(ValueError, match="min_count=0"):
        kept_token_ids([[2]], {0}, 12, min_count=0)


def test_nearest_fallback_sends_each_dropped_id_to_its_most_similar_kept_row():
    """``method.emb_fallback=nearest``: a dropped id reads the row of the kept id with the most cosine-similar
    embedding (not [UNK]'s); the per-id map travels in the plan and a rebuilt model reads the same rows."""
    model = Tiny()
    w = model.embeddings.word_embeddings.weight.detach()
    original = w.clone()
    with torch.no_grad():  # id 2 points where kept id 20 points, at another length; id 39 opposite to kept 33
        w[2] = 3 * w[20] + 0.01 * w[5]
        w[39] = -w[33]
    fallback = nearest_kept_ids(w, KEPT)
    kept = torch.tensor(KEPT)
    assert fallback.shape == (V,) and torch.equal(fallback[kept], kept) and bool(torch.isin(fallback, kept).all())
    assert fallback[2] == 20 and fallback[39] != 33
    sims = nn.functional.normalize(w, dim=-1) @ nn.functional.normalize(w[kept], dim=-1).t()
    assert torch.equal(fallback, kept[sims.argmax(-1)])  # brute force over all ids, chunking aside
    assert torch.equal(nearest_kept_ids(w, KEPT, chunk=3), fallback)

    original = w.clone()
    trim_vocabulary(model, KEPT, fallback.tolist())
    emb = model.embeddings.word_embeddings
    assert emb.fallback == fallback.tolist() and "per id" in repr(emb)
    torch.testing.assert_close(model(torch.arange(V)), original[fallback], rtol=0, atol=0)
    trim_vocabulary(model, KEPT, fallback.tolist())  # the same map again: a no-op
    assert model.embeddings.word_embeddings is emb
    with pytest.raises(ValueError, match="already trimmed"):
        trim_vocabulary(model, KEPT, 1)

    plan = PruningPlan.from_dict(PruningPlan(embedding_vocab=KEPT, embedding_fallback=fallback.tolist()).to_dict())
    assert plan.embedding_fallback == fallback.tolist()
    trained = tiny_bert(0)
    trim_vocabulary(trained, KEPT, plan.embedding_fallback)
    fresh = apply_plan(tiny_bert(1), plan)
    fresh.load_state_dict(trained.state_dict())
    ids = torch.randint(0, V, (3, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fresh(ids).logits, trained(ids).logits, rtol=0, atol=0)

    bad = fallback.clone()
    bad[3] = 1  # a kept id must read its own row
    with pytest.raises(ValueError, match="its own row"):
        trim_vocabulary(Tiny(), KEPT, bad.tolist())
    bad = fallback.clone()
    bad[2] = 4  # 4 is not kept
    with pytest.raises(ValueError, match="among the kept ids"):
        trim_vocabulary(Tiny(), KEPT, bad.tolist())
    with pytest.raises(ValueError, match=f"needs {V} ids"):
        trim_vocabulary(Tiny(), KEPT, fallback[:-1].tolist())
