"""Product quantisation of attention queries and keys (SPT, Gui et al., arXiv 2312.10365).

A head vector of ``head_dim`` numbers is cut into ``head_dim / codeword_dim`` sub-vectors; each sub-vector is
replaced by the nearest of ``codebook_size`` codewords of its subspace. SPT uses the codes to estimate
``q . k`` cheaply and keep, per query, only the keys with the largest estimates.

The codebooks learn online, as mini-batch k-means with exponential moving averages (the VQ-VAE EMA rule):
every training forward assigns the layer's query and key sub-vectors to their nearest codewords and moves
each codeword towards the mean of what it was assigned, ``decay`` controlling how fast. A codeword that stops
being used is re-seeded from a random sub-vector of the batch, so no codeword stays dead. The official code
trains the codebooks with an auxiliary loss instead (MSE of the inputs to their hard centroids plus a soft-
vs-hard centroid term); the EMA rule reaches the same k-means fixed point without a loss term, and keeps the
codebooks out of the optimizer. Everything lives in buffers, so checkpoints and exports carry the codebooks.
"""

from __future__ import annotations

import torch
from torch import nn


class ProductQuantizer(nn.Module):
    """Codebooks ``[subspaces, codebook_size, codeword_dim]`` shared by the queries and keys of one layer."""

    def __init__(
        self,
        head_dim: int,
        codeword_dim: int = 8,
        codebook_size: int = 16,
        decay: float = 0.99,
        max_update_vectors: int = 8192,
        dead_threshold: float = 1e-3,
    ):
        super().__init__()
        if head_dim % codeword_dim:
            raise ValueError(f"codeword_dim={codeword_dim} does not divide head_dim={head_dim}")
        self.head_dim = head_dim
        self.codeword_dim = codeword_dim
        self.subspaces = head_dim // codeword_dim
        self.codebook_size = codebook_size
        self.decay = decay
        self.max_update_vectors = max_update_vectors
        self.dead_threshold = dead_threshold
        shape = (self.subspaces, codebook_size, codeword_dim)
        self.register_buffer("codebook", torch.zeros(shape))
        self.register_buffer("ema_count", torch.zeros(self.subspaces, codebook_size))
        self.register_buffer("ema_sum", torch.zeros(shape))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., head_dim]`` -> ``[n, subspaces, codeword_dim]`` (float32)."""
        return x.reshape(-1, self.subspaces, self.codeword_dim).float()

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes ``[..., subspaces]`` (int64): the nearest codeword (Euclidean) per sub-vector."""
        sub = self._split(x)  # [n, S, d]
        cb = self.codebook.float()
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; the ||x||^2 term does not change the argmin
        dist = (cb * cb).sum(-1).unsqueeze(0) - 2 * torch.einsum("nsd,scd->nsc", sub, cb)
        return dist.argmin(-1).reshape(*x.shape[:-1], self.subspaces)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """The reconstructed vectors ``[..., head_dim]`` of ``codes`` ``[..., subspaces]``."""
        flat = codes.reshape(-1, self.subspaces)
        rows = self.codebook[torch.arange(self.subspaces, device=flat.device), flat]  # [n, S, d]
        return rows.reshape(*codes.shape[:-1], self.head_dim)

    @torch.no_grad()
    def update(self, *tensors: torch.Tensor) -> None:
        """One online k-means (EMA) step on the sub-vectors of ``tensors`` (each ``[..., head_dim]``)."""
        sub = torch.cat([self._split(t.detach()) for t in tensors])
        if sub.shape[0] > self.max_update_vectors:  # a random subset is enough for the running means
            sub = sub[torch.randperm(sub.shape[0], device=sub.device)[: self.max_update_vectors]]
        if not bool(self.initialized):
            self._seed(sub, torch.ones(self.subspaces, self.codebook_size, dtype=torch.bool, device=sub.device))
            self.ema_sum.copy_(self.codebook)
            self.ema_count.fill_(1.0)
            self.initialized.fill_(True)
        codes = self.encode(sub.reshape(sub.shape[0], self.head_dim))  # [n, S]
        one_hot = torch.zeros(sub.shape[0], self.subspaces, self.codebook_size, device=sub.device)
        one_hot.scatter_(-1, codes.unsqueeze(-1), 1.0)
        counts = one_hot.sum(0)  # [S, C]
        sums = torch.einsum("nsc,nsd->scd", one_hot, sub)
        self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.ema_count.sum(-1, keepdim=True)  # Laplace smoothing keeps empty codewords finite
        smoothed = (self.ema_count + 1e-5) / (n + self.codebook_size * 1e-5) * n
        self.codebook.copy_(self.ema_sum / smoothed.unsqueeze(-1))
        dead = self.ema_count < self.dead_threshold * n / self.codebook_size
        if dead.any():
            self._seed(sub, dead)
            self.ema_sum[dead] = self.codebook[dead]
            self.ema_count[dead] = (n.expand_as(self.ema_count) / self.codebook_size)[dead]

    def _seed(self, sub: torch.Tensor, where: torch.Tensor) -> None:
        """Codewords at ``where`` ([S, C] bool) become random sub-vectors of the batch."""
        pick = torch.randint(0, sub.shape[0], (self.subspaces, self.codebook_size), device=sub.device)
        fresh = sub[pick, torch.arange(self.subspaces, device=sub.device).unsqueeze(-1)]  # [S, C, d]
        self.codebook[where] = fresh[where].to(self.codebook.dtype)

    def extra_repr(self) -> str:
        return f"subspaces={self.subspaces}, codeword_dim={self.codeword_dim}, codebook_size={self.codebook_size}, decay={self.decay}"
