"""Module-wise dynamic scaling (Tao et al., ACL 2022): a symmetric uniform weight quantizer with one learnable
clipping factor ``alpha`` per module, trained through a straight-through estimator for the rounding.

``Q(w) = alpha * (2 k / L - 1)``, ``k = round((clip(w / alpha, -1, 1) + 1) * L / 2)``, ``L = 2^bits - 1``: the
``2^bits`` levels are evenly spaced in ``[-alpha, alpha]`` and the integer code ``k`` is what export stores.
With the rounding's derivative taken as 1, autograd gives the paper's scaling gradient:
``dQ/dalpha = Q(w)/alpha - w/alpha`` inside the clipping range and ``sign(w)`` outside, so every weight (not
only the clipped ones, as in PACT) moves ``alpha``; ``dQ/dw`` is 1 inside and 0 outside.
"""

from __future__ import annotations

import math

import torch
from torch import nn

MIN_BITS, MAX_BITS = 2, 8
SCALE_INITS = ("mse", "mean_abs", "max_abs")
_MSE_GRID = 100  # candidate clipping factors tried by the ``mse`` initialisation
_MSE_SAMPLE = 1 << 16  # weights the ``mse`` search looks at (an even stride through the matrix)


class RoundSTE(torch.autograd.Function):
    """``round`` in the forward pass (exact, so export reproduces it bit for bit), identity in the backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def quantize_codes(w: torch.Tensor, alpha: torch.Tensor, bits: int, ste: bool = True) -> torch.Tensor:
    """The integer codes ``k`` in ``[0, 2^bits - 1]``, as floats (differentiable through ``RoundSTE``)."""
    half = (2**bits - 1) / 2
    u = torch.clamp(w / alpha, -1.0, 1.0)
    x = (u + 1.0) * half
    return RoundSTE.apply(x) if ste else torch.round(x)


def dequantize(codes: torch.Tensor, alpha: torch.Tensor, bits: int) -> torch.Tensor:
    """Weights from integer codes: ``alpha * (2 k / L - 1)`` (the same float operations as the forward pass)."""
    return alpha * (codes * (2.0 / (2**bits - 1)) - 1.0)


def fake_quantize(w: torch.Tensor, alpha: torch.Tensor, bits: int) -> torch.Tensor:
    """``Q(w)`` with straight-through gradients to ``w`` and ``alpha``."""
    return dequantize(quantize_codes(w, alpha, bits), alpha, bits)


@torch.no_grad()
def initial_scale(w: torch.Tensor, bits: int, how: str) -> float:
    """The clipping factor a quantizer starts from, from the weights' statistics.

    ``mean_abs``: ``mean |w|``; ``max_abs``: ``max |w|`` (nothing clipped); ``mse``: the factor on a grid of
    ``max |w| * i / 100`` that minimises the squared quantization error (a larger clip at more bits)."""
    w = w.detach().float().flatten()
    if how == "mean_abs":
        return max(w.abs().mean().item(), 1e-8)
    top = max(w.abs().max().item(), 1e-8)
    if how == "max_abs":
        return top
    if how != "mse":
        raise ValueError(f"unknown scale initialisation {how!r}; accepted: {', '.join(SCALE_INITS)}")
    if w.numel() > _MSE_SAMPLE:
        w = w[:: math.ceil(w.numel() / _MSE_SAMPLE)]
    cands = torch.linspace(top / _MSE_GRID, top, _MSE_GRID, dtype=w.dtype, device=w.device)[:, None]
    err = (dequantize(quantize_codes(w[None, :], cands, bits, ste=False), cands, bits) - w[None, :]).pow(2).sum(1)
    return cands[int(err.argmin())].item()


class WeightQuantizer(nn.Module):
    """One module's quantizer: ``bits`` and the learnable clipping factor ``alpha`` (a scalar parameter)."""

    def __init__(self, weight: torch.Tensor, bits: int, scale_init: str = "mse", learn_scale: bool = True):
        super().__init__()
        if not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(f"bits={bits} is outside [{MIN_BITS}, {MAX_BITS}]")
        self.bits = bits
        value = initial_scale(weight, bits, scale_init)
        self.alpha = nn.Parameter(torch.tensor(value, dtype=torch.float32, device=weight.device), requires_grad=learn_scale)

    def clip(self) -> torch.Tensor:
        return self.alpha.abs().clamp_min(1e-8)  # a step past zero must not flip or zero the levels

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quantize(w, self.clip().to(w.dtype), self.bits)

    @torch.no_grad()
    def codes(self, w: torch.Tensor) -> torch.Tensor:
        """The integer codes of ``w`` (uint8), as export stores them."""
        return quantize_codes(w, self.clip().to(w.dtype), self.bits, ste=False).to(torch.uint8)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes of ``numel`` codes of ``bits`` bits packed back to back."""
    return (numel * bits + 7) // 8


_CHUNK = 1 << 20  # codes per packing chunk (a multiple of 8, so every chunk ends on a byte boundary)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``codes`` (any shape, values < 2^bits) as a bit stream, most significant bit first, in
    ``ceil(numel * bits / 8)`` uint8 bytes."""
    flat = codes.detach().flatten().to(torch.int32).cpu()
    shifts = torch.arange(bits - 1, -1, -1, dtype=torch.int32)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.int32)
    out = []
    for start in range(0, flat.numel(), _CHUNK):
        bitstream = ((flat[start : start + _CHUNK, None] >> shifts) & 1).flatten()
        pad = (-bitstream.numel()) % 8
        if pad:
            bitstream = torch.cat([bitstream, bitstream.new_zeros(pad)])
        out.append((bitstream.view(-1, 8) * weights).sum(1).to(torch.uint8))
    packed = torch.cat(out) if out else torch.zeros(0, dtype=torch.uint8)
    assert packed.numel() == packed_nbytes(flat.numel(), bits)
    return packed


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """The inverse of :func:`pack_codes`: ``numel`` codes (int64)."""
    shifts = torch.arange(bits - 1, -1, -1, dtype=torch.int64)
    byte_shifts = torch.arange(7, -1, -1, dtype=torch.int64)
    chunk_bytes = _CHUNK * bits // 8
    out = []
    for start in range(0, packed.numel(), chunk_bytes):
        bitstream = ((packed[start : start + chunk_bytes].to(torch.int64)[:, None] >> byte_shifts) & 1).flatten()
        n = bitstream.numel() // bits
        out.append((bitstream[: n * bits].view(n, bits) << shifts).sum(1))
    codes = torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)
    return codes[:numel]
