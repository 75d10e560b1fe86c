"""Trainable scalar gates on attention units and FFN neurons (Light-PEFT's masks; mask-based pruning).

A gate multiplies the input of the attention output projection per unit (the same as scaling that unit's
attention probabilities, since the gate is a scalar per head) and the input of the FFN down projection per
neuron (the post-activation intermediate output). Hooks, not modified modeling code, so any family with a
block layout gets them and SDPA/flash attention keep working. An optional gate over the hidden dimension,
shared by all layers, acts on the residual stream (see ``hidden_gate.py`` for where and why it is exact).
"""

from __future__ import annotations

import torch
from torch import nn

from lightmods.structure.spec import Block, blocks

GATES_ATTR = "structure_gates"


class StructureGates(nn.Module):
    """One gate vector per layer for attention units and one for FFN neurons, initialised to 1; with
    ``hidden_sites``, one more vector over the hidden dimension shared by every layer."""

    def __init__(self, model_blocks: list[Block], heads: bool = True, neurons: bool = True, hidden_sites=None):
        super().__init__()
        ref = model_blocks[0].linear(model_blocks[0].layout.key).weight
        ones = lambda n: nn.Parameter(torch.ones(n, dtype=torch.float32, device=ref.device))  # noqa: E731
        self.heads = nn.ParameterList([ones(b.num_units) for b in model_blocks]) if heads else None
        self.neurons = nn.ParameterList([ones(b.num_neurons) for b in model_blocks]) if neurons else None
        self._hidden_sites = hidden_sites  # a plain attribute: the hooked modules are not submodules of the gates
        self.hidden = ones(ref.shape[1]) if hidden_sites is not None else None
        self._handles: list = []

    def attach(self, model_blocks: list[Block]) -> None:
        for i, block in enumerate(model_blocks):
            if self.heads is not None:
                hook = _unit_gate(self.heads, i, block.head_dim * block.group)
                self._handles.append(block.linear(block.layout.attn_out).register_forward_pre_hook(hook))
            if self.neurons is not None:
                hook = _neuron_gate(self.neurons, i)
                self._handles.append(block.linear(block.layout.ffn_out).register_forward_pre_hook(hook))
        if self.hidden is not None:
            from lightmods.structure.hidden_gate import attach_hidden_gate

            self._handles += attach_hidden_gate(self.hidden, self._hidden_sites)

    def detach_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def l1(self) -> torch.Tensor:
        """Sum of absolute gate values over all layers (the official code's L1 term: a sum, not a mean)."""
        terms = [p.abs().sum() for group in (self.heads, self.neurons) if group is not None for p in group]
        if self.hidden is not None:
            terms.append(self.hidden.abs().sum())
        return torch.stack(terms).sum()


def _unit_gate(gates: nn.ParameterList, layer: int, width: int):
    def hook(module, args):
        (x, *rest) = args
        g = gates[layer].to(x.dtype)
        shaped = x.view(*x.shape[:-1], g.numel(), width) * g[:, None]
        return (shaped.view_as(x), *rest)

    return hook


def _neuron_gate(gates: nn.ParameterList, layer: int):
    def hook(module, args):
        (x, *rest) = args
        return (x * gates[layer].to(x.dtype), *rest)

    return hook


def add_gates(model: nn.Module, heads: bool = True, neurons: bool = True, hidden: bool = False) -> StructureGates:
    model_blocks = blocks(model)
    sites = None
    if hidden:
        from lightmods.structure.hidden_gate import hidden_sites

        sites = hidden_sites(model)
    gates = StructureGates(model_blocks, heads=heads, neurons=neurons, hidden_sites=sites)
    gates.attach(model_blocks)
    setattr(model, GATES_ATTR, gates)
    return gates


def get_gates(model: nn.Module) -> StructureGates | None:
    return getattr(model, GATES_ATTR, None)


def remove_gates(model: nn.Module) -> None:
    """Drop the gates and their hooks (after pruning the survivors count as 1, as in the official code)."""
    gates = get_gates(model)
    if gates is not None:
        gates.detach_hooks()
        delattr(model, GATES_ATTR)


def _weight_of(layer: nn.Module) -> nn.Linear:
    """The plain linear layer whose weights a gate scales (the base layer of a wrapping adapter)."""
    return getattr(layer, "base_layer", layer)


@torch.no_grad()
def fold_gates(model: nn.Module, gates: StructureGates) -> list[str]:
    """Multiply the values of ``gates`` into the weights they scale in ``model`` (the gated model or a gate-free
    copy of it), so that removing the gates afterwards keeps what the surviving gates did instead of resetting
    them to 1. Returns the kinds folded.

    Exact for attention units (columns of the attention output projection) and FFN neurons (columns of the
    FFN output projection). The hidden gate's scaling folds into what writes the residual stream (post-norm:
    the norms' weight and bias; pre-norm: the embedding columns and the rows and biases of the attention/FFN
    output projections), while its weighting of the norms' statistics has no plain-weight form: exact when the
    kept hidden gates share one value, close otherwise. A pre-norm model whose embedding is tied to its output
    head keeps its hidden gate unfolded (scaling the embedding would scale the head too)."""
    model_blocks = blocks(model)
    done = []
    for i, b in enumerate(model_blocks):
        if gates.heads is not None:
            w = _weight_of(b.linear(b.layout.attn_out)).weight
            g = gates.heads[i].detach().to(w.dtype).repeat_interleave(b.head_dim * b.group)
            w.mul_(g.to(w.device)[None, :])
        if gates.neurons is not None:
            w = _weight_of(b.linear(b.layout.ffn_out)).weight
            w.mul_(gates.neurons[i].detach().to(w.dtype).to(w.device)[None, :])
    done += [k for k in ("heads", "neurons") if getattr(gates, k) is not None]
    if gates.hidden is None:
        return done
    from lightmods.structure.hidden_gate import hidden_sites

    m = gates.hidden.detach()
    sites = hidden_sites(model)
    if sites.mask_norm_outputs:  # post-norm: the stream is the norms' output
        for norm in sites.norms:
            for p in (norm.weight, getattr(norm, "bias", None)):
                if p is not None:
                    p.mul_(m.to(p.dtype).to(p.device))
        return [*done, "hidden"]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tables = [s for s in sites.writers if isinstance(s, nn.Embedding)]
    if head is not None and any(t.weight is head.weight for t in tables):
        return done
    for site in sites.writers:
        if isinstance(site, nn.Embedding):
            site.weight.mul_(m.to(site.weight.dtype).to(site.weight.device)[None, :])
        else:
            lin = _weight_of(site)
            lin.weight.mul_(m.to(lin.weight.dtype).to(lin.weight.device)[:, None])
            if lin.bias is not None:
                lin.bias.mul_(m.to(lin.bias.dtype).to(lin.bias.device))
    return [*done, "hidden"]
