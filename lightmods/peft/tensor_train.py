"""Tensor-train (TT) linear layers, as used by LoRETTA (Yang et al., NAACL 2024).

A weight ``W`` (``in x out``) is stored as K cores ``G_k`` of shape ``(r_{k-1}, n_k, r_k)`` with
``r_0 = r_K = 1``, every inner rank equal to the tensor rank, and ``prod(n_k) = in * out``. Contracting the
cores along their rank dimensions gives a tensor of shape ``(n_1, ..., n_K)``; reshaped (row-major) to
``(in, out)`` it is ``W``, and the layer computes ``x @ W + b``. The layer has ``sum_k r_{k-1} n_k r_k``
weight parameters (plus ``out`` for the bias) instead of ``in * out``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# The TT shapes the official LoRETTA code uses (``loretta/utils/tensor_util.py``), keyed by the bottleneck
# (adapter size, or LoRA rank) and then by the hidden size; each shape's product is ``hidden * bottleneck``.
# Left out: the official entries whose product is not ``hidden * bottleneck`` (bottleneck 32 with hidden
# 1024, 1280, 1536, 1600, 4096, 5120, 8192 repeat the bottleneck-16 shapes; bottleneck 64 with hidden 2304
# is 2304 * 128), on which the official layer cannot reshape; :func:`factorize` covers those sizes.
OFFICIAL_TT_SHAPES: dict[int, dict[int, tuple[int, ...]]] = {
    5: {
        768: (5, 8, 12, 8), 1024: (4, 8, 5, 8, 4), 1280: (4, 8, 5, 8, 5), 1536: (4, 8, 5, 8, 6),
        1600: (5, 8, 5, 8, 5), 2304: (5, 8, 8, 4, 9), 4096: (16, 16, 5, 4, 4), 5120: (5, 8, 10, 8, 8),
        8192: (4, 16, 16, 10, 4),
    },
    8: {
        768: (8, 8, 12, 8), 1024: (4, 8, 8, 8, 4), 1280: (4, 8, 8, 8, 5), 1536: (4, 8, 8, 8, 6),
        1600: (5, 8, 8, 8, 5), 2304: (8, 8, 8, 4, 9), 4096: (16, 16, 8, 4, 4), 5120: (8, 8, 10, 8, 8),
        8192: (4, 16, 16, 16, 4),
    },
    16: {
        768: (8, 16, 12, 8), 1024: (4, 8, 16, 8, 4), 1280: (4, 8, 16, 8, 5), 1536: (4, 8, 16, 8, 6),
        1600: (5, 8, 16, 8, 5), 2304: (8, 8, 8, 8, 9), 4096: (16, 16, 16, 4, 4), 5120: (8, 16, 10, 8, 8),
        8192: (4, 16, 16, 16, 8),
    },
    32: {768: (4, 8, 12, 8, 8), 2304: (8, 8, 16, 8, 9)},
    64: {
        768: (8, 8, 12, 8, 8), 1024: (4, 8, 8, 8, 8, 4), 1280: (4, 8, 8, 8, 8, 5), 1536: (4, 8, 8, 8, 8, 6),
        1600: (5, 8, 8, 8, 8, 5), 4096: (16, 16, 16, 4, 4, 4), 5120: (5, 8, 8, 16, 8, 8),
        8192: (4, 16, 16, 16, 8, 4),
    },
    128: {
        768: (8, 16, 12, 8, 8), 1024: (4, 8, 16, 8, 8, 4), 1280: (4, 8, 16, 8, 8, 5), 1536: (4, 8, 16, 8, 8, 6),
        1600: (5, 8, 16, 8, 8, 5), 4096: (16, 16, 16, 8, 4, 4), 5120: (5, 8, 16, 16, 8, 8),
        8192: (4, 16, 16, 16, 16, 4),
    },
}  # fmt: skip

TT_INITS = ("zero", "gaussian")


def _prime_factors(n: int) -> list[int]:
    out, p = [], 2
    while p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    if n > 1:
        out.append(n)
    return out


def factorize(n: int, max_factor: int = 16) -> tuple[int, ...]:
    """``n`` as a product of few, balanced factors of at most ``max_factor`` where its primes allow.

    Uses the fewest modes K (at least 2 when ``n`` is not prime) with ``max_factor**K >= n``, spreads the
    prime factors over them largest first (each to the currently smallest mode), then places the largest
    modes at the two ends of the train, where the cores are cheapest (``r * n`` rather than ``r**2 * n``).
    """
    if n < 1:
        raise ValueError(f"cannot factorize {n}")
    primes = sorted(_prime_factors(n), reverse=True)
    k = 1
    while max_factor**k < n:
        k += 1
    k = min(max(k, 2), max(len(primes), 1))
    modes = [1] * k
    for p in primes:
        modes[modes.index(min(modes))] *= p
    modes.sort(reverse=True)
    front, back = [], []
    for i, m in enumerate(modes):
        (front if i % 2 == 0 else back).append(m)
    return tuple(front + back[::-1])


def tt_shape(hidden: int, bottleneck: int, max_factor: int = 16) -> tuple[int, ...]:
    """The TT shape of a ``hidden <-> bottleneck`` projection: the official table's entry where it has one,
    else :func:`factorize` of ``hidden * bottleneck``. The product is always ``hidden * bottleneck``."""
    official = OFFICIAL_TT_SHAPES.get(bottleneck, {}).get(hidden)
    if official is not None:
        return official
    return factorize(hidden * bottleneck, max_factor)


def tt_parameter_count(shape: tuple[int, ...] | list[int], rank: int) -> int:
    """``sum_k r_{k-1} n_k r_k`` with ``r_0 = r_K = 1`` and every inner rank ``rank``."""
    ranks = [1] + [rank] * (len(shape) - 1) + [1]
    return sum(ranks[k] * n * ranks[k + 1] for k, n in enumerate(shape))


class TTLinear(nn.Module):
    """``y = x @ W + b`` with ``W`` (``in x out``) in tensor-train format.

    ``init="gaussian"`` is the official initialization: ``G_k ~ N(0, 1) / sqrt(r_k) * sigma**(1/K)`` with
    ``sigma = sqrt(1 / (in + out))``, so the entries of ``W`` have standard deviation ``sigma``; the bias
    is uniform in ``+-1/sqrt(out)``. ``init="zero"`` is the same with the last core and the bias at zero,
    so ``W = 0`` and the layer outputs zero (the other cores get gradients once the last one moves).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        shape: tuple[int, ...] | list[int],
        rank: int,
        bias: bool = True,
        init: str = "gaussian",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        shape = tuple(int(n) for n in shape)
        if math.prod(shape) != in_features * out_features:
            raise ValueError(
                f"TT shape {shape} has {math.prod(shape)} entries, not {in_features} * {out_features}"
            )
        if init not in TT_INITS:
            raise ValueError(f"init={init!r}; accepted: one of {', '.join(TT_INITS)}")
        self.in_features, self.out_features = in_features, out_features
        self.shape, self.rank = shape, rank
        self.ranks = (1,) + (rank,) * (len(shape) - 1) + (1,)
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(self.ranks[k], n, self.ranks[k + 1], device=device, dtype=dtype))
            for k, n in enumerate(shape)
        )
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.reset_parameters(init)

    @torch.no_grad()
    def reset_parameters(self, init: str = "gaussian") -> None:
        order = len(self.shape)
        sigma = math.sqrt(1.0 / (self.in_features + self.out_features))
        for core in self.cores:
            core.normal_().mul_(sigma ** (1.0 / order) / math.sqrt(core.shape[-1]))
        if init == "zero":
            self.cores[-1].zero_()
        if self.bias is not None:
            if init == "zero":
                self.bias.zero_()
            else:
                bound = 1.0 / math.sqrt(self.out_features)
                self.bias.uniform_(-bound, bound)

    def full_weight(self) -> torch.Tensor:
        """``W`` as an ``in x out`` matrix (the layer is ``x @ W + b``)."""
        out = self.cores[0]
        for core in self.cores[1:]:
            out = torch.tensordot(out, core, dims=([-1], [0]))
        return out.reshape(self.in_features, self.out_features)

    def dense_weight(self) -> torch.Tensor:
        """``W`` in ``nn.Linear``'s layout, ``out x in``."""
        return self.full_weight().T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x @ self.full_weight()
        return out + self.bias if self.bias is not None else out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, shape={list(self.shape)}, rank={self.rank}, bias={self.bias is not None}"
