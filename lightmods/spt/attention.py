"""SPT sparse multi-head attention: each query attends only to the keys with the largest product-quantised
estimates of ``q . k`` (Gui et al., arXiv 2312.10365).

Per layer and head: queries and keys (after RoPE in decoders) are encoded by the layer's
:class:`~lightmods.spt.quantizer.ProductQuantizer`; the estimate of ``q . k`` is the inner product of their
reconstructions, ``sum_s <c_s(q), c_s(k)>`` over subspaces. Masked keys (padding, and future keys in
decoders) get ``-inf``; every query keeps its ``ceil(key_fraction * kv_len)`` best keys. The estimate runs
without autograd and in query chunks, so it holds no ``L x L`` tensor beyond one chunk.

Attention is then computed only on the kept entries by :class:`SparseAttentionFunction`: the selected keys
and values are gathered chunk by chunk (SDDMM), the softmax runs over the kept entries, the output is the
probability-weighted sum of the gathered values (SpMM), and backward recomputes the gathers. What is saved
for backward is the queries, keys, values, the selected indices (int32) and the kept probabilities, so the
attention's activation memory scales with ``key_fraction`` instead of ``L^2``. (The official code selects by
the count of equal codes with CUDA kernels and clamps the scores to +-10; here the codebook inner product
ranks, and the scores are not clamped, so ``key_fraction=1`` is exactly dense attention.)

The function plugs into transformers through its public ``AttentionInterface`` (no transformers code is
edited): :func:`enable` registers it under ``lightmods_spt`` with the eager additive mask, and sets the
model's attention implementation. A module without :class:`SparseAttentionState` (``spt_attn``) falls back
to SDPA.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lightmods.spt.quantizer import ProductQuantizer

SPT_ATTENTION = "lightmods_spt"
CHUNK_ELEMENTS = 1 << 23  # ~32 MB of float32 per transient chunk tensor


class SparseAttentionState(nn.Module):
    """What one attention module needs for SPT: its quantizer and the kept fraction of keys."""

    def __init__(self, head_dim: int, key_fraction: float, codeword_dim: int, codebook_size: int, decay: float):
        super().__init__()
        self.key_fraction = key_fraction
        self.pq = ProductQuantizer(head_dim, codeword_dim, codebook_size, decay)
        self.enabled = True

    def extra_repr(self) -> str:
        return f"key_fraction={self.key_fraction}"


def num_selected(key_fraction: float, kv_len: int) -> int:
    """Keys kept per query: ``ceil(key_fraction * kv_len)``, at least 1."""
    return max(1, min(kv_len, math.ceil(key_fraction * kv_len - 1e-9)))


def allowed_keys(attention_mask: torch.Tensor | None, q_len: int, kv_len: int, causal: bool, device) -> torch.Tensor | None:
    """A boolean ``[B|1, 1, q_len, kv_len]`` of the keys each query may see (None: all). The additive float
    masks transformers builds hold 0 or the dtype's minimum; anything below half the minimum is masked."""
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            return attention_mask
        return attention_mask > torch.finfo(attention_mask.dtype).min / 2
    if causal and q_len > 1:
        return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)[None, None]
    return None


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _rows_per_chunk(per_row: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, per_row))


@torch.no_grad()
def estimated_scores(q_hat: torch.Tensor, k_hat: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """The full ``[B, H, Lq, Lk]`` PQ estimate with masked keys at ``-inf`` (reference and tests only)."""
    est = q_hat @ k_hat.transpose(-1, -2)
    return est.masked_fill(~allowed, float("-inf")) if allowed is not None else est


@torch.no_grad()
def select_keys(
    query: torch.Tensor, key: torch.Tensor, pq: ProductQuantizer, k: int, allowed: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query (``[B, H, Lq, D]``) the indices ``[B, H, Lq, k]`` of the keys (``[B, H, Lk, D]``) with the
    largest PQ estimates, and whether each selected key is allowed (a row with fewer than ``k`` allowed keys
    fills up with masked ones, which the attention then ignores)."""
    q_hat = pq.decode(pq.encode(query)).to(query.dtype)
    k_hat = pq.decode(pq.encode(key)).to(key.dtype).transpose(-1, -2)
    B, H, Lq, _ = query.shape
    idx = torch.empty(B, H, Lq, k, dtype=torch.long, device=query.device)
    valid = torch.empty(B, H, Lq, k, dtype=torch.bool, device=query.device)
    step = _rows_per_chunk(B * H * key.shape[-2])
    for r0 in range(0, Lq, step):
        r1 = min(Lq, r0 + step)
        est = q_hat[:, :, r0:r1] @ k_hat
        if allowed is not None:
            est.masked_fill_(~allowed[:, :, r0:r1], float("-inf"))
        vals, ind = est.topk(k, dim=-1)
        idx[:, :, r0:r1] = ind
        valid[:, :, r0:r1] = vals > float("-inf")
    return idx, valid


class SparseAttentionFunction(torch.autograd.Function):
    """``softmax(scaling * q . k_j  for j in idx) @ v_idx`` per query, with gathers instead of ``L x L`` tensors.

    Shapes: ``q [N, L, D]``, ``k [N, Lk, D]``, ``v [N, Lk, Dv]``, ``idx [N, L, K]`` (int64), ``valid [N, L, K]``
    (bool or None). Attention dropout ``p_drop`` drops kept probabilities as ``nn.Dropout`` would.
    """

    @staticmethod
    def forward(ctx, q, k, v, idx, valid, scaling: float, p_drop: float):
        N, L, D = q.shape
        Lk, Dv, K = k.shape[1], v.shape[-1], idx.shape[-1]
        base = (torch.arange(N, device=q.device) * Lk).view(N, 1, 1)
        kf, vf = k.reshape(N * Lk, D), v.reshape(N * Lk, Dv)
        out = q.new_empty(N, L, Dv)
        probs = q.new_empty(N, L, K)
        keep = torch.empty(N, L, K, dtype=torch.bool, device=q.device) if p_drop > 0 else None
        low = torch.finfo(q.dtype).min
        step = _rows_per_chunk(N * K * max(D, Dv))
        for r0 in range(0, L, step):
            r1 = min(L, r0 + step)
            flat = (idx[:, r0:r1] + base).reshape(-1)
            ks = kf.index_select(0, flat).view(N, r1 - r0, K, D)
            s = torch.einsum("ncd,nckd->nck", q[:, r0:r1], ks) * scaling
            if valid is not None:
                s.masked_fill_(~valid[:, r0:r1], low)
            p = torch.softmax(s.to(_acc(q.dtype)), dim=-1).to(q.dtype)
            probs[:, r0:r1] = p
            if keep is not None:
                m = torch.rand_like(p, dtype=torch.float32) >= p_drop
                keep[:, r0:r1] = m
                p = p * m / (1 - p_drop)
            vs = vf.index_select(0, flat).view(N, r1 - r0, K, Dv)
            out[:, r0:r1] = torch.einsum("nck,nckd->ncd", p, vs)
        ctx.save_for_backward(q, k, v, idx.to(torch.int32), probs, keep)
        ctx.scaling, ctx.p_drop, ctx.step = scaling, p_drop, step
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, idx, probs, keep = ctx.saved_tensors
        N, L, D = q.shape
        Lk, Dv, K = k.shape[1], v.shape[-1], idx.shape[-1]
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        base = (torch.arange(N, device=q.device) * Lk).view(N, 1, 1)
        kf, vf = k.reshape(N * Lk, D), v.reshape(N * Lk, Dv)
        dq = torch.zeros_like(q) if need_q else None
        acc = _acc(q.dtype)  # half-precision gradients accumulate in float32
        dk = torch.zeros(N * Lk, D, dtype=acc, device=q.device) if need_k else None
        dv = torch.zeros(N * Lk, Dv, dtype=acc, device=q.device) if need_v else None
        grad = grad.contiguous()
        for r0 in range(0, L, ctx.step):
            r1 = min(L, r0 + ctx.step)
            c = r1 - r0
            flat = (idx[:, r0:r1].long() + base).reshape(-1)
            p, g = probs[:, r0:r1], grad[:, r0:r1]
            pd = p if keep is None else p * keep[:, r0:r1] / (1 - ctx.p_drop)
            if need_v:
                dv.index_add_(0, flat, (pd.unsqueeze(-1) * g.unsqueeze(2)).reshape(-1, Dv).to(acc))
            if not (need_q or need_k):
                continue
            vs = vf.index_select(0, flat).view(N, c, K, Dv)
            dp = torch.einsum("ncd,nckd->nck", g, vs)
            if keep is not None:
                dp = dp * keep[:, r0:r1] / (1 - ctx.p_drop)
            ds = p * (dp - (dp * p).sum(-1, keepdim=True)) * ctx.scaling
            if need_q:
                ks = kf.index_select(0, flat).view(N, c, K, D)
                dq[:, r0:r1] = torch.einsum("nck,nckd->ncd", ds, ks)
            if need_k:
                dk.index_add_(0, flat, (ds.unsqueeze(-1) * q[:, r0:r1].unsqueeze(2)).reshape(-1, D).to(acc))
        dk = dk.view_as(k).to(k.dtype) if need_k else None
        dv = dv.view_as(v).to(v.dtype) if need_v else None
        return dq, dk, dv, None, None, None, None


def sparse_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor | None,
    scaling: float, p_drop: float = 0.0,
) -> torch.Tensor:  # fmt: skip
    """``[B, H, Lq, Dv]`` attention output over the selected keys ``idx`` (``[B, H, Lq, K]``)."""
    B, H, Lq, D = query.shape
    Lk, Dv = key.shape[-2], value.shape[-1]
    out = SparseAttentionFunction.apply(
        query.reshape(B * H, Lq, D), key.reshape(B * H, Lk, D), value.reshape(B * H, Lk, Dv),
        idx.reshape(B * H, Lq, -1), None if valid is None else valid.reshape(B * H, Lq, -1), scaling, p_drop,
    )  # fmt: skip
    return out.view(B, H, Lq, Dv)


def _repeat_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Grouped-query attention: each key/value head serves ``groups`` query heads."""
    if groups == 1:
        return x
    B, Hkv, L, D = x.shape
    return x[:, :, None].expand(B, Hkv, groups, L, D).reshape(B, Hkv * groups, L, D)


def spt_attention_forward(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0, **kwargs,
):  # fmt: skip
    """transformers attention-interface entry: ``[B, H, L, D]`` inputs, ``([B, L, H, D], None)`` out."""
    state = getattr(module, "spt_attn", None)
    if state is None or not state.enabled:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    groups = query.shape[1] // key.shape[1]
    key, value = _repeat_heads(key, groups), _repeat_heads(value, groups)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if state.training or not bool(state.pq.initialized):
        state.pq.update(query, key)  # online k-means step (in eval only once, to seed an untrained codebook)
    Lq, Lk = query.shape[-2], key.shape[-2]
    allowed = allowed_keys(attention_mask, Lq, Lk, bool(getattr(module, "is_causal", False)), query.device)
    idx, valid = select_keys(query, key, state.pq, num_selected(state.key_fraction, Lk), allowed)
    if bool(valid.all()):
        valid = None
    out = sparse_attention(query, key, value, idx, valid, scaling, dropout if module.training else 0.0)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make ``lightmods_spt`` a transformers attention implementation, with the eager additive mask."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(SPT_ATTENTION, spt_attention_forward)
    AttentionMaskInterface.register(SPT_ATTENTION, eager_mask)
