"""Group lasso over adapter groups: GS-LoRA's group-sparse structure loss (Zhao et al., CVPR 2024), usable
with any LoRA-family method (every :class:`~lightmods.peft.AdapterLayer` contributes its own parameters).

``L = sum_g ||g||`` with ``||g|| = sqrt(sum_{W in g} ||W||_F^2)``: a plain sum over groups, with no
``sqrt(|g|)`` weighting and no epsilon, as the official code. At a zero group the subgradient 0 is taken
(``torch.linalg.vector_norm``), so a group that is exactly zero (LoRA's ``B`` at initialisation under the
``matrix`` grouping) gives no NaN.

Groupings (``grouping``):

- ``block`` (the official default): every adapter matrix of one transformer block; the block is the
  module name up to its first numeric component (``bert.encoder.layer.3``, ``vit.layers.0``, ``model.layers.5``);
- ``module``: each adapted linear layer, its A and B together (the official ``lora``);
- ``matrix``: each adapter matrix alone (the official ``matrix``);
- ``type``: one group per module type across blocks (all ``attention.self.query`` adapters, all ``...value``).

A group counts as zero when every entry is at most ``threshold`` in absolute value. Dropping a zero group
removes the adapter layers it touches (for a product ``B A`` one zero factor zeroes the layer's update), so
they are left out of ``export/``. :func:`group_lasso_term` is the ``LossTerm`` (with a warm-up in steps).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from lightmods.methods.base import LossTerm
from lightmods.peft import AdapterLayer, adapter_layers

GROUPINGS = ("block", "module", "matrix", "type")
_BLOCK = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def block_of(name: str) -> str:
    """The block a module belongs to: its name up to the first numeric component (the name itself if none)."""
    m = _BLOCK.match(name)
    return m.group(1) if m else name


def adapter_groups(model: nn.Module, grouping: str = "block") -> dict[str, list[tuple[str, nn.Parameter]]]:
    """``{group name: [(parameter name, parameter), ...]}`` over every adapter layer's own parameters, in
    model order."""
    if grouping not in GROUPINGS:
        raise ValueError(f"grouping={grouping!r}; accepted: {', '.join(GROUPINGS)}")
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for name, layer in adapter_layers(model):
        own = {id(p) for p in layer.adapter_parameters()}
        for pname, p in layer.named_parameters():
            if id(p) not in own:
                continue
            full = f"{name}.{pname}"
            if grouping == "block":
                key = block_of(name)
            elif grouping == "module":
                key = name
            elif grouping == "matrix":
                key = full.removesuffix(".weight")
            else:  # type: the name without its block prefix
                block = block_of(name)
                key = name[len(block) + 1 :] if name != block else name
            groups.setdefault(key, []).append((full, p))
    return groups


def group_norm(params: list[nn.Parameter] | list[torch.Tensor]) -> torch.Tensor:
    """``sqrt(sum ||W||_F^2)`` over a group, differentiable, with the subgradient 0 at zero."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.float()) for p in params]))


def group_lasso(groups: dict[str, list[tuple[str, nn.Parameter]]]) -> torch.Tensor:
    """``sum_g ||g||`` (0 for no groups)."""
    norms = [group_norm([p for _, p in members]) for members in groups.values()]
    return torch.stack(norms).sum() if norms else torch.zeros(())


def group_lasso_term(weight: float, grouping: str = "block", warmup_steps: int = 0, name: str = "group_lasso") -> LossTerm:
    """``LossTerm(name)``: ``weight * group_lasso`` over the module's adapter groups, 0 for the first
    ``warmup_steps`` optimizer steps (the official warm-up: no penalty, then the full weight). Logged
    unweighted as ``train/loss_<name>``."""

    def fn(module, batch: dict, logits: torch.Tensor) -> torch.Tensor:
        return group_lasso(adapter_groups(module.model, grouping)).to(logits.device)

    def schedule(step: int) -> float:
        return 0.0 if step < warmup_steps else 1.0

    return LossTerm(name, weight, fn, schedule=schedule)


@torch.no_grad()
def group_report(model: nn.Module, grouping: str = "block", threshold: float = 1e-3) -> dict:
    """Per-group norms, which groups are zero (every entry ``<= threshold`` in absolute value), their count and
    the share left non-zero; for ``summary.json``."""
    groups = adapter_groups(model, grouping)
    norms, zero = {}, []
    for key, members in groups.items():
        params = [p for _, p in members]
        norms[key] = round(float(group_norm(params)), 6)
        if max(float(p.detach().abs().max()) for p in params) <= threshold:
            zero.append(key)
    n = len(groups)
    return {
        "grouping": grouping,
        "groups": n,
        "zero_groups": zero,
        "groups_zero": len(zero),
        "groups_nonzero_frac": round((n - len(zero)) / n, 6) if n else None,
        "group_norms": norms,
    }


def layers_of_groups(model: nn.Module, names: list[str], grouping: str = "block") -> list[str]:
    """The adapter layers with a parameter in one of the groups ``names``."""
    groups = adapter_groups(model, grouping)
    params = {full for key in names for full, _ in groups.get(key, [])}
    return [name for name, layer in adapter_layers(model) if any(f"{name}.{p}" in params for p, _ in layer.named_parameters())]


@torch.no_grad()
def zero_groups_(model: nn.Module, names: list[str], grouping: str = "block") -> None:
    """Set the parameters of the groups ``names`` to exactly zero (in place): the model then computes what it
    computes with those groups dropped, and keeps its structure (checkpoints stay loadable)."""
    groups = adapter_groups(model, grouping)
    for key in names:
        for _, p in groups.get(key, []):
            p.zero_()


def remove_adapters(model: nn.Module, names: list[str]) -> list[str]:
    """Replace the adapter layers ``names`` by the base layers they wrap (in place); returns the names."""
    for name in names:
        layer = model.get_submodule(name)
        if not isinstance(layer, AdapterLayer):
            raise TypeError(f"{name} is not an adapter layer")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base_layer)
    return list(names)


def drop_zero_groups(model: nn.Module, grouping: str = "block", threshold: float = 1e-3) -> list[str]:
    """Remove the adapter layers of every zero group; returns the removed layer names."""
    zero = group_report(model, grouping, threshold)["zero_groups"]
    return remove_adapters(model, layers_of_groups(model, zero, grouping))
