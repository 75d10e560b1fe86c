"""Low-rank factorisation of the word embedding (COST-EFF's slenderization of the embedding).

``E (V x H)`` is replaced by ``E1 (V x r)`` followed by ``Linear(r -> H, bias=False)`` with weight ``E2^T``,
from the truncated SVD ``E = U S V^T``: ``E1 = U[:, :r] diag(S[:r])``, ``E2 = V^T[:r]``. An already factorised
embedding is re-factorised from its product ``E1 E2`` (the ``V x H`` product is never formed). Position and token-type embeddings are left alone; the residual width ``H`` never changes.

Row weights (``token_weights``: how often each token occurs in the training data) make the factorisation the best
rank-``r`` one in the weighted norm ``sum_i w_i ||E_i - E1_i E2||^2`` instead of the plain one: every token is still
projected onto an ``r``-dimensional subspace, but the subspace is the one that preserves the tokens the task reads.
A task uses a fraction of a 30k vocabulary (SST-2's sentences: 11.6k word pieces), and the plain SVD spends its rank
on the rest as much as on those (measured on a MiniLM SST-2 teacher, rank 48: 74.5 dev accuracy plain, 78.9
weighted, 88.0 unfactorised; ``experiments/bench/embedding_factorization.py``). Not in COST-EFF, which uses the plain SVD.

Vocabulary trimming (``TrimmedEmbedding``) goes one step further: the rows of tokens the training split never uses
are dropped, and those ids read the row of a fallback token (``[UNK]``). The tokenizer is unchanged; a buffer maps
each token id to its row. At the same parameter count the rank can then be about ``V / V_kept`` times higher (SST-2:
11.6k of 30.5k rows). Not in COST-EFF either; the cost is that the 2.5% of SST-2 dev tokens unseen in training all
read ``[UNK]``, or (``nearest_kept_ids``) each the row of the kept token nearest to it in the embedding space.
With the nearest fallback the rows of rare training tokens can go too (``kept_token_ids(min_count=k)``): a token seen
once or twice reads a similar token's row, and the budget buys a higher rank for the rest.
"""

from __future__ import annotations

import torch
from torch import nn


class FactorizedEmbedding(nn.Module):
    """``Embedding(V, r)`` then ``Linear(r -> H, bias=False)``: a drop-in for the word embedding."""

    def __init__(self, num_embeddings: int, rank: int, embedding_dim: int, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.rank, self.embedding_dim = num_embeddings, rank, embedding_dim
        self.padding_idx = padding_idx
        self.embed = nn.Embedding(num_embeddings, rank, padding_idx=padding_idx)
        self.proj = nn.Linear(rank, embedding_dim, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.embed(input_ids))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, rank={self.rank}, {self.embedding_dim}"


class TrimmedEmbedding(nn.Module):
    """A word embedding that keeps the rows of ``kept_ids`` only: token ``kept_ids[i]`` reads row ``i`` of
    ``inner`` (an ``nn.Embedding`` or :class:`FactorizedEmbedding` with ``len(kept_ids)`` rows), every other id
    reads the row of a kept id: ``fallback`` (one id for all, e.g. [UNK]), or ``fallback[id]`` when ``fallback``
    lists one kept id per token id (:func:`nearest_kept_ids`). Accepts the whole id space, so tokenizer and data
    pipeline stay as they are."""

    def __init__(self, inner: nn.Module, kept_ids: torch.Tensor, fallback, num_embeddings: int):
        super().__init__()
        kept_ids = torch.as_tensor(kept_ids, dtype=torch.long).cpu()
        if kept_ids.numel() != inner.num_embeddings:
            raise ValueError(f"{kept_ids.numel()} kept ids for an embedding of {inner.num_embeddings} rows")
        index_map = trimmed_rows(kept_ids, fallback, num_embeddings)
        single = torch.as_tensor(fallback)
        self.fallback_id = int(single) if single.dim() == 0 else None
        self.inner = inner
        self.num_embeddings, self.embedding_dim = num_embeddings, inner.embedding_dim
        self.padding_idx = None if inner.padding_idx is None else int(kept_ids[inner.padding_idx])  # an id, not a row
        self.register_buffer("kept_ids", kept_ids)
        self.register_buffer("index_map", index_map, persistent=False)  # rebuilt from kept_ids and fallback

    @property
    def fallback(self):
        """What the constructor took: one id, or the id every token id reads (a list)."""
        if self.fallback_id is not None:
            return self.fallback_id
        return self.kept_ids[self.index_map].tolist()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.inner(self.index_map[input_ids])

    def extra_repr(self) -> str:
        fallback = self.fallback_id if self.fallback_id is not None else "per id"
        return f"{self.num_embeddings} ids -> {self.inner.num_embeddings} rows, fallback={fallback}"


def trimmed_rows(kept_ids, fallback, num_embeddings: int) -> torch.Tensor:
    """For every token id, the row of the trimmed table (the rows of ``kept_ids``, in order) that it reads: its
    own for a kept id, else that of ``fallback`` (one kept id for all, or a list of one kept id per token id)."""
    kept_ids = torch.as_tensor(kept_ids, dtype=torch.long).cpu()
    row_of = torch.full((num_embeddings,), -1, dtype=torch.long)
    row_of[kept_ids] = torch.arange(kept_ids.numel())
    per_id = torch.as_tensor(fallback, dtype=torch.long).cpu()
    if per_id.dim() == 0:
        per_id = torch.where(row_of >= 0, torch.arange(num_embeddings), per_id)
    elif per_id.shape != (num_embeddings,):
        raise ValueError(f"a fallback per token id needs {num_embeddings} ids, not {per_id.numel()}")
    elif not torch.equal(per_id[kept_ids], kept_ids):
        raise ValueError("a kept token id must read its own row")
    rows = row_of[per_id.clamp(0, num_embeddings - 1)]
    outside = (per_id < 0) | (per_id >= num_embeddings) | (rows < 0)
    if bool(outside.any()):
        bad = sorted(set(per_id[outside].tolist()))
        raise ValueError(f"the fallback token id {', '.join(map(str, bad[:5]))} must be among the kept ids")
    return rows


def kept_token_ids(input_ids, special_ids, vocab_size: int, min_count: int = 1) -> torch.Tensor:
    """Sorted ids of the tokens that occur at least ``min_count`` times in ``input_ids`` (a list of token-id
    lists, e.g. the encoded training split) and of ``special_ids`` (which the model reads whatever the data:
    [CLS], [SEP], [PAD], [UNK], ...). A ``min_count`` above 1 also drops the rows of rare training tokens, which
    then read a fallback row like unseen ones, so a fixed parameter budget buys a higher rank."""
    if min_count < 1:
        raise ValueError(f"min_count={min_count}: accepted: an integer >= 1")
    seen = token_weights(input_ids, vocab_size, smoothing=0.0) >= min_count
    seen[torch.as_tensor(sorted(special_ids), dtype=torch.long)] = True
    return seen.nonzero().flatten()


@torch.no_grad()
def nearest_kept_ids(weight: torch.Tensor, kept_ids, chunk: int = 4096) -> torch.Tensor:
    """For every token id (a row of the ``V x H`` embedding matrix ``weight``), the kept id whose row is the
    most cosine-similar: itself for a kept id. Used as a per-id fallback, so a word unseen in training reads
    a related word's row (a morphological variant or a near synonym) rather than all reading [UNK]'s."""
    kept = torch.as_tensor(kept_ids, dtype=torch.long).to(weight.device)
    unit = nn.functional.normalize(weight.float(), dim=-1)
    keys = unit[kept]
    out = torch.arange(weight.shape[0], device=weight.device)
    dropped = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
    dropped[kept] = False
    todo = dropped.nonzero().flatten()
    for lo in range(0, todo.numel(), chunk):
        ids = todo[lo : lo + chunk]
        out[ids] = kept[(unit[ids] @ keys.t()).argmax(-1)]
    return out.cpu()


def word_embedding_owner(model: nn.Module) -> tuple[nn.Module, str]:
    """(module, attribute) holding the word embedding: ``<base>.embeddings.word_embeddings`` in encoders,
    ``<base>.embed_tokens`` in decoders."""
    base = getattr(model, "base_model", model)
    for owner_name, attr in (("embeddings", "word_embeddings"), ("", "embed_tokens")):
        owner = getattr(base, owner_name, None) if owner_name else base
        emb = getattr(owner, attr, None) if owner is not None else None
        # a wrapper that keeps its embedding as ``base_layer`` (method=quant's QuantEmbedding) counts too
        if isinstance(getattr(emb, "base_layer", emb), (nn.Embedding, FactorizedEmbedding, TrimmedEmbedding)):
            return owner, attr
    raise ValueError(f"no word embedding found in a {type(model).__name__}")


def embedding_rank(model: nn.Module) -> int | None:
    """The rank of a factorised word embedding, None when it is a plain embedding."""
    owner, attr = word_embedding_owner(model)
    emb = getattr(owner, attr)
    emb = emb.inner if isinstance(emb, TrimmedEmbedding) else emb
    return emb.rank if isinstance(emb, FactorizedEmbedding) else None


def embedding_vocab(model: nn.Module) -> int | None:
    """How many token ids keep a row of their own in a trimmed word embedding; None when it is not trimmed."""
    owner, attr = word_embedding_owner(model)
    emb = getattr(owner, attr)
    return emb.inner.num_embeddings if isinstance(emb, TrimmedEmbedding) else None


def token_weights(input_ids, vocab_size: int, smoothing: float = 1.0) -> torch.Tensor:
    """Row weights for :func:`low_rank_factors`: how many times each token id occurs in ``input_ids`` (a list
    of token-id lists, e.g. the encoded training split) plus ``smoothing``, so unseen tokens still count a little."""
    flat = torch.as_tensor([t for ids in input_ids for t in ids], dtype=torch.long)
    return torch.bincount(flat, minlength=vocab_size).double() + smoothing


@torch.no_grad()
def low_rank_factors(
    emb: nn.Module, rank: int, row_weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(E1, E2)`` (``V x r``, ``r x H``) of the best rank-``r`` approximation of the embedding matrix ``E``:
    ``E2 = V_r^T``, the top right singular vectors, and ``E1 = E V_r = U_r diag(S_r)``. The right singular
    vectors come from the eigendecomposition of the ``H x H`` Gram matrix in float64 (the same factors as
    ``svd(E)``, without a ``V x V``-sized decomposition: seconds instead of a minute for BERT's vocabulary).
    With ``row_weights`` (``V``, positive) the Gram matrix is ``E^T diag(w) E``: the best approximation in the
    row-weighted norm, still ``E1 = E V_r``."""

    def weighted(rows: torch.Tensor) -> torch.Tensor:
        return rows if row_weights is None else row_weights.double().to(rows.device)[:, None] * rows

    if isinstance(emb, FactorizedEmbedding):
        e1, e2 = emb.embed.weight.double(), emb.proj.weight.double().t()  # E = E1 E2
        gram = e2.t() @ (e1.t() @ weighted(e1)) @ e2
    else:
        e = emb.weight.double()
        gram = e.t() @ weighted(e)
    _, vecs = torch.linalg.eigh(gram)  # ascending eigenvalues
    rank = min(rank, gram.shape[0])
    v = vecs[:, -rank:].flip(-1)  # (H, r), largest first
    e1 = (emb.embed.weight.double() @ (e2 @ v)) if isinstance(emb, FactorizedEmbedding) else e @ v
    return e1.float(), v.t().float()


@torch.no_grad()
def factorize_embedding(model: nn.Module, rank: int, row_weights: torch.Tensor | None = None) -> nn.Module:
    """Replace the word embedding of ``model`` by its rank-``rank`` SVD factorisation (in place; weighted by
    ``row_weights`` when given); a no-op when it is already factorised at that rank."""
    owner, attr = word_embedding_owner(model)
    emb = getattr(owner, attr)
    trimmed = emb if isinstance(emb, TrimmedEmbedding) else None
    if trimmed is not None:  # factorise the kept rows, weighted by their own counts
        emb = trimmed.inner
        row_weights = row_weights[trimmed.kept_ids.to(row_weights.device)] if row_weights is not None else None
    if isinstance(emb, FactorizedEmbedding) and emb.rank == rank:
        return model
    ref = emb.embed.weight if isinstance(emb, FactorizedEmbedding) else emb.weight
    e1, e2 = low_rank_factors(emb, rank, row_weights)
    new = FactorizedEmbedding(e1.shape[0], e1.shape[1], e2.shape[1], padding_idx=emb.padding_idx)
    new.embed.weight.copy_(e1)
    new.proj.weight.copy_(e2.t())
    new.to(device=ref.device, dtype=ref.dtype)
    new.requires_grad_(ref.requires_grad)
    if trimmed is not None:
        trimmed.inner = new
    else:
        setattr(owner, attr, new)
    return model


@torch.no_grad()
def trim_vocabulary(model: nn.Module, kept_ids, fallback) -> nn.Module:
    """Keep the word-embedding rows of ``kept_ids`` only (in place; see :class:`TrimmedEmbedding`); every other
    token id reads the row of ``fallback`` (one id, or one per token id). A no-op when the embedding already
    keeps exactly these ids with this fallback."""
    owner, attr = word_embedding_owner(model)
    emb = getattr(owner, attr)
    kept = torch.as_tensor(kept_ids, dtype=torch.long).cpu()
    if isinstance(emb, TrimmedEmbedding):
        want = torch.as_tensor(fallback)
        if torch.equal(emb.kept_ids.cpu(), kept) and emb.fallback == (
            int(want) if want.dim() == 0 else want.tolist()
        ):
            return model
        raise ValueError("the word embedding is already trimmed to another vocabulary")
    pad = None  # the padding id's row in the trimmed table
    if emb.padding_idx is not None and bool((kept == emb.padding_idx).any()):
        pad = int((kept == emb.padding_idx).nonzero()[0, 0])
    if isinstance(emb, FactorizedEmbedding):
        ref = emb.embed.weight
        inner = FactorizedEmbedding(kept.numel(), emb.rank, emb.embedding_dim, padding_idx=pad)
        inner.embed.weight.copy_(ref[kept.to(ref.device)])
        inner.proj.weight.copy_(emb.proj.weight)
    elif type(emb) is nn.Embedding:
        ref = emb.weight
        inner = nn.Embedding(kept.numel(), emb.embedding_dim, padding_idx=pad)
        inner.weight.copy_(ref[kept.to(ref.device)])
    else:
        raise ValueError(f"cannot trim the vocabulary of a {type(emb).__name__} word embedding")
    inner.to(device=ref.device, dtype=ref.dtype).requires_grad_(ref.requires_grad)
    new = TrimmedEmbedding(inner, kept, fallback, emb.num_embeddings).to(ref.device)
    setattr(owner, attr, new)
    return model
