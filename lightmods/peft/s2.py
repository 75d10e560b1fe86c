"""S2FT's trainable slices (Yang et al., NeurIPS 2024): a dense delta on a contiguous slice of a frozen linear.

After S2FT's co-permutation the selected attention heads / FFN channels of a block are contiguous, so
what trains in a projection is one dense sub-matrix of its weight:

- ``axis="out"`` (value / up projections): the output rows ``start:end``; ``s2_delta`` is
  ``(end - start) x in`` and ``y[..., start:end] += x @ s2_delta.T``.
- ``axis="in"`` (attention-output / down projections): the input columns ``start:end``; ``s2_delta`` is
  ``out x (end - start)`` and ``y += x[..., start:end] @ s2_delta.T``.

The delta starts at zero and is kept apart from the base weight (the decoupled adapter of the paper's
``s2ft/s2.py``), so :meth:`merge` fuses it into the base slice and :meth:`unmerge` takes it out again.

Partial back-propagation (the paper's ``efficiency/s2ft.py``): :class:`S2LinearFunction` computes the full
input gradient but keeps for backward only what the delta's gradient needs. For an input-column slice that
is a contiguous copy of ``x[..., start:end]`` (plain autograd would keep a *view* of the slice, which holds
the whole ``x`` alive); for an output-row slice it is the full ``x`` (``grad delta = g[..., start:end]^T x``),
as in the official code. The frozen base weight needs no saved input at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightmods.peft.layer import AdapterLayer

AXES = ("out", "in")


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


class S2LinearFunction(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` plus the slice delta, with a backward that saves only what it needs.

    Gradients flow to every argument that requires one (so it is exact against plain autograd); the input
    is saved in full only when the base weight trains or the slice is a row slice.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, delta, start: int, end: int, axis: str):
        device_type = x.device.type
        autocast = torch.is_autocast_enabled(device_type)
        ctx.autocast = (device_type, torch.get_autocast_dtype(device_type), autocast)
        ctx.start, ctx.end, ctx.axis = start, end, axis
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype, delta.dtype)
        ctx.has_bias = bias is not None
        y = F.linear(x, weight, bias)
        if axis == "in":
            y = y + F.linear(x[..., start:end], delta)
        else:
            y[..., start:end] += F.linear(x, delta).to(y.dtype)
        _, needs_w, _, needs_d = ctx.needs_input_grad[:4]
        cast = ctx.autocast[1] if autocast else x.dtype
        if needs_w or (needs_d and axis == "out"):
            saved_x = x
        elif needs_d:
            saved_x = x[..., start:end].to(cast, copy=True).contiguous()  # a copy: the full x can be freed
        else:
            saved_x = None
        ctx.save_for_backward(weight, delta, saved_x)
        return y

    @staticmethod
    def backward(ctx, g):
        weight, delta, saved_x = ctx.saved_tensors
        s, e, axis = ctx.start, ctx.end, ctx.axis
        x_dtype, w_dtype, b_dtype, d_dtype = ctx.dtypes
        needs_x, needs_w, needs_b, needs_d = ctx.needs_input_grad[:4]
        grad_x = grad_w = grad_b = grad_d = None
        device_type, ac_dtype, enabled = ctx.autocast
        with torch.autocast(device_type, dtype=ac_dtype, enabled=enabled):
            if needs_x:
                grad_x = (g @ weight).to(x_dtype)
                if axis == "in":
                    grad_x[..., s:e] += (g @ delta).to(x_dtype)
                else:
                    grad_x += (g[..., s:e] @ delta).to(x_dtype)
            if needs_w:
                grad_w = (_flat(g).T @ _flat(saved_x)).to(w_dtype)
            if needs_b and ctx.has_bias:
                grad_b = _flat(g).sum(0).to(b_dtype)
            if needs_d:
                if axis == "in":
                    xs = saved_x[..., s:e] if needs_w else saved_x  # the full input, or the saved slice
                    grad_d = _flat(g).T @ _flat(xs)
                else:
                    grad_d = _flat(g[..., s:e]).T @ _flat(saved_x)
                grad_d = grad_d.to(d_dtype)
        return grad_x, grad_w, grad_b, grad_d, None, None, None


def s2_linear(x, weight, bias, delta, start: int, end: int, axis: str) -> torch.Tensor:
    return S2LinearFunction.apply(x, weight, bias, delta, start, end, axis)


class S2Linear(AdapterLayer):
    """A frozen linear plus a trainable dense delta on its output rows or input columns ``start:end``.

    ``partial_backprop=False`` computes the same function with plain autograd (for tests and for measuring
    what the custom backward saves).
    """

    def __init__(self, base_layer: nn.Linear, start: int, end: int, axis: str, partial_backprop: bool = True):
        super().__init__(base_layer)
        if axis not in AXES:
            raise ValueError(f"axis={axis!r}; accepted: one of {', '.join(AXES)}")
        size = self.out_features if axis == "out" else self.in_features
        if not 0 <= start <= end <= size:
            raise ValueError(f"slice {start}:{end} is outside the {size} {axis}put features of the layer")
        self.axis, self.start, self.end = axis, int(start), int(end)
        self.partial_backprop = partial_backprop
        w = base_layer.weight
        shape = (end - start, self.in_features) if axis == "out" else (self.out_features, end - start)
        self.s2_delta = nn.Parameter(torch.zeros(shape, device=w.device, dtype=w.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        if not self.partial_backprop:
            return self.adapter_forward(x, self.base_layer(x))
        b = self.base_layer
        return s2_linear(x, b.weight, b.bias, self.s2_delta, self.start, self.end, self.axis)

    def adapter_forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """The reference path with plain autograd."""
        if self.axis == "in":
            return base_out + F.linear(x[..., self.start : self.end], self.s2_delta)
        part = F.linear(x, self.s2_delta)
        return base_out + F.pad(part, (self.start, self.out_features - self.end))

    def delta_weight(self) -> torch.Tensor:
        w = self.base_layer.weight
        full = torch.zeros(w.shape, device=w.device, dtype=self.s2_delta.dtype)
        if self.axis == "out":
            full[self.start : self.end] = self.s2_delta
        else:
            full[:, self.start : self.end] = self.s2_delta
        return full

    def select_adapter_features(self, out_index, in_index) -> None:
        """Follow structural surgery of the base layer. On the sliced axis the kept trainable features must
        stay contiguous (as they do after pruning units that lie outside the slice, or within it)."""
        from lightmods.peft.layer import derive_parameter

        sliced_index, other_index = (out_index, in_index) if self.axis == "out" else (in_index, out_index)
        sliced_dim = 0 if self.axis == "out" else 1
        if sliced_index is not None:
            sliced_index = torch.as_tensor(sliced_index, dtype=torch.long)
            inside = ((sliced_index >= self.start) & (sliced_index < self.end)).nonzero().flatten()
            if len(inside) and not torch.equal(
                inside, torch.arange(int(inside[0]), int(inside[0]) + len(inside))
            ):
                raise NotImplementedError(
                    "structural surgery would make the trainable S2 slice non-contiguous"
                )
            self.s2_delta = derive_parameter(self.s2_delta, sliced_dim, sliced_index[inside] - self.start)
            self.start = int(inside[0]) if len(inside) else 0
            self.end = self.start + len(inside)
        if other_index is not None:
            self.s2_delta = derive_parameter(
                self.s2_delta, 1 - sliced_dim, torch.as_tensor(other_index, dtype=torch.long)
            )

    @property
    def size(self) -> int:
        return self.end - self.start

    def extra_repr(self) -> str:
        return f"axis={self.axis}, slice={self.start}:{self.end}, partial_backprop={self.partial_backprop}"
