"""Parameter counts by role (backbone, adapters, task head), as reported in ``summary.json``."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from lightmods.peft.inject import adapter_layers, match_module


def count_parameters(model: nn.Module, head_patterns: Sequence[str] = ()) -> dict:
    """``params_total``, ``params_trainable`` and a per-role breakdown (total and trainable per role)."""
    role_of: dict[int, str] = {}
    for name, module in model.named_modules():
        if head_patterns and match_module(name, head_patterns):
            for p in module.parameters():
                role_of[id(p)] = "head"
    for _, layer in adapter_layers(model):
        for p in layer.adapter_parameters():
            role_of[id(p)] = "adapter"
    roles = {r: {"total": 0, "trainable": 0} for r in ("backbone", "adapter", "head")}
    seen = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        r = roles[role_of.get(id(p), "backbone")]
        r["total"] += p.numel()
        r["trainable"] += p.numel() if p.requires_grad else 0
    total = sum(r["total"] for r in roles.values())
    trainable = sum(r["trainable"] for r in roles.values())
    return {
        "params_total": total,
        "params_trainable": trainable,
        "params_trainable_pct": round(100.0 * trainable / max(total, 1), 4),
        "params_by_role": roles,
    }
