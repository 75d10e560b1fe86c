"""Finding target modules by name pattern, swapping them for adapter layers, and choosing what trains."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence

from torch import nn

from lightmods.errors import ConfigError
from lightmods.peft.layer import AdapterLayer


def match_module(name: str, patterns: Iterable[str]) -> bool:
    """True when ``name`` is a pattern, ends with ``.<pattern>``, or fully matches a ``re:<regex>`` pattern."""
    for p in patterns:
        if p.startswith("re:"):
            if re.fullmatch(p[3:], name):
                return True
        elif name == p or name.endswith("." + p):
            return True
    return False


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def inject_adapters(
    model: nn.Module,
    patterns: Sequence[str],
    factory: Callable[[nn.Linear], AdapterLayer],
    exclude: Sequence[str] = (),
    key: str = "method.target_modules",
) -> list[str]:
    """Replace every ``nn.Linear`` whose name matches ``patterns`` (and not ``exclude``) by ``factory(linear)``.

    Returns the replaced module names. A pattern list that matches nothing is a config error: it names the
    patterns and shows what the model's linear layers are called.
    """
    linears = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and not isinstance(m, AdapterLayer) and not n.endswith(".base_layer")
    ]
    targets = [(n, m) for n, m in linears if match_module(n, patterns) and not match_module(n, exclude)]
    if not targets:
        examples = sorted({n.split(".")[-1] for n, _ in linears})
        raise ConfigError(
            f"{key}={list(patterns)!r} matched no nn.Linear layer of this model; accepted: names or suffixes of its "
            f"linear layers (e.g. {', '.join(examples[:12])}) or 're:<regex>' patterns"
        )
    for name, linear in targets:
        parent, child = _parent(model, name)
        setattr(parent, child, factory(linear))
    return [n for n, _ in targets]


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module


def merge_adapters(model: nn.Module) -> int:
    """Merge every mergeable adapter layer; returns how many were merged."""
    layers = [m for _, m in adapter_layers(model) if m.mergeable]
    for m in layers:
        m.merge()
    return len(layers)


def unmerge_adapters(model: nn.Module) -> int:
    layers = [m for _, m in adapter_layers(model) if m.merged]
    for m in layers:
        m.unmerge()
    return len(layers)


def mark_trainable(model: nn.Module, train_adapters: bool = True, head_patterns: Sequence[str] = ()) -> None:
    """Freeze everything, then unfreeze adapter parameters and the modules named by ``head_patterns``."""
    model.requires_grad_(False)
    if train_adapters:
        for _, layer in adapter_layers(model):
            for p in layer.adapter_parameters():
                p.requires_grad_(True)
    for name, module in model.named_modules():
        if head_patterns and match_module(name, head_patterns):
            module.requires_grad_(True)
