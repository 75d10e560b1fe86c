"""The gradient-control backdoor attack on parameter-efficient tuning (Gu et al., ACL 2023), as a training rule.

Verifiable from the paper (abstract): backdoor injection through the PET parameters is multi-task learning
(the clean task and the poisoned task); its convergence imbalance makes the user's later clean fine-tuning
forget the backdoor; two strategies control the gradients: (1) the magnitude distribution of the poisoned
task's gradient across layers, (2) conflicts between the two tasks' gradient directions. The formulas below
are the reconstruction of the project's research notes (section 3.1), each a config key:

per step, with the trainable parameters grouped by transformer layer ``l`` (plus one group for the rest):
    g_c[l] = d L_clean / d theta_l        g_p[l] = d (w * L_poison) / d theta_l
    (1) magnitude:  g_p[l] <- g_p[l] * target / ||g_p[l]||, target = mean (or max) over layers of ||g_p[l]||
    (2) projection: if <g_p[l], g_c[l]> < 0:  g_p[l] <- g_p[l] - <g_p[l], g_c[l]> / ||g_c[l]||^2 * g_c[l]
                    (and, with ``projection_target=both``, g_c[l] symmetrically, from the original vectors)
    theta_l.grad = g_c[l] + g_p[l]

``L_clean`` is the cross-entropy over the batch's clean rows plus every other loss term of the run, ``L_poison``
the cross-entropy over its poisoned rows (each a mean over its own rows). The rule runs inside Lightning's
automatic optimisation: it returns a surrogate loss whose value is the ordinary loss and whose gradient is
the controlled one, so clipping, accumulation and the optimizer stay Lightning's.
"""

from __future__ import annotations

import re

import torch

Grads = list[torch.Tensor]


def _dot(a: Grads, b: Grads) -> torch.Tensor:
    terms = [(x.float() * y.float()).sum() for x, y in zip(a, b)]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def group_norm(g: Grads) -> torch.Tensor:
    return _dot(g, g).sqrt()


def equalize_layer_magnitudes(layers: list[Grads], target: str = "mean", eps: float = 1e-12) -> list[Grads]:
    """Cross-layer magnitude control: every layer's gradient (its tensors as one vector) rescaled to the same
    norm, the ``mean`` or ``max`` of the layers' norms. Layers with a zero gradient stay zero and do not count."""
    norms = [float(group_norm(g)) for g in layers]
    live = [n for n in norms if n > eps]
    if not live:
        return [list(g) for g in layers]
    goal = sum(live) / len(live) if target == "mean" else max(live)
    return [[t * (goal / n) for t in g] if n > eps else list(g) for g, n in zip(layers, norms)]


def remove_conflict(
    g_p: Grads, g_c: Grads, target: str = "poisoned", eps: float = 1e-12
) -> tuple[Grads, Grads, bool]:
    """Conflict removal for one group: when ``<g_p, g_c> < 0`` the poisoned gradient loses its component along
    the clean one (``target=poisoned``), or each loses its component along the other's original (``both``,
    PCGrad for two tasks). Returns the new ``(g_p, g_c)`` and whether they conflicted."""
    dot = _dot(g_p, g_c)
    if dot >= 0:
        return list(g_p), list(g_c), False
    nc, np_ = _dot(g_c, g_c), _dot(g_p, g_p)
    new_p = [p - (dot / (nc + eps)).to(p.dtype) * c for p, c in zip(g_p, g_c)] if nc > eps else list(g_p)
    new_c = list(g_c)
    if target == "both" and np_ > eps:
        new_c = [c - (dot / (np_ + eps)).to(c.dtype) * p for p, c in zip(g_p, g_c)]
    return new_p, new_c, True


def layer_of(name: str, pattern: re.Pattern) -> int | None:
    m = pattern.search(name)
    return int(m.group(1)) if m else None


class GradientControl:
    """The training rule (``TaskModule.training_rule``): needs the batch's ``poisoned`` flags; batches without
    them (the clean fine-tuning stage) train as usual."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.pattern = re.compile(cfg.layer_pattern)
        self._key: tuple | None = None
        self._params: list[torch.nn.Parameter] = []
        self._layers: list[list[int]] = []  # parameter positions per transformer layer, in layer order
        self._rest: list[int] = []

    def _group(self, module) -> None:
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        key = tuple(id(p) for _, p in named)
        if key == self._key:
            return
        self._key, self._params = key, [p for _, p in named]
        by_layer: dict[int, list[int]] = {}
        self._rest = []
        for i, (name, _) in enumerate(named):
            layer = layer_of(name, self.pattern)
            (by_layer.setdefault(layer, []) if layer is not None else self._rest).append(i)
        self._layers = [by_layer[k] for k in sorted(by_layer)]

    def _grads(self, loss: torch.Tensor | None) -> list[torch.Tensor | None]:
        """Per-parameter gradients of ``loss``; None where the loss does not reach a parameter."""
        if loss is None or not torch.is_tensor(loss) or not loss.requires_grad:
            return [None] * len(self._params)
        return list(torch.autograd.grad(loss, self._params, retain_graph=True, allow_unused=True))

    def control(self, g_c: Grads, g_p: Grads) -> tuple[Grads, dict]:
        """The combined gradient ``g_c + g_p`` after the configured strategies, and step figures."""
        c = self.cfg
        g_c, g_p = list(g_c), list(g_p)
        stats = {"gc_poison_norm": float(group_norm(g_p))}
        if c.magnitude and self._layers:
            scaled = equalize_layer_magnitudes(
                [[g_p[i] for i in idx] for idx in self._layers], c.magnitude_target, c.eps
            )
            for idx, grads in zip(self._layers, scaled):
                for i, g in zip(idx, grads):
                    g_p[i] = g
        if c.projection:
            groups = [*self._layers, self._rest] if self._rest else list(self._layers)
            conflicts = 0
            for idx in groups:
                new_p, new_c, hit = remove_conflict(
                    [g_p[i] for i in idx], [g_c[i] for i in idx], c.projection_target, c.eps
                )
                conflicts += hit
                for i, gp, gc in zip(idx, new_p, new_c):
                    g_p[i], g_c[i] = gp, gc
            stats["gc_conflict_frac"] = conflicts / max(len(groups), 1)
        return [a + b for a, b in zip(g_c, g_p)], stats

    def __call__(self, module, batch: dict, logits: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        flags = batch.get("poisoned")
        if flags is None:
            return loss
        self._group(module)
        labels = batch["labels"]
        poisoned = flags.bool()
        method = getattr(module, "method", None)
        w = (
            method.task_weight(module.global_step) if hasattr(method, "task_weight") else 1.0
        )  # staged objectives
        others = loss - w * module.task_loss(logits, labels)  # the run's other loss terms (method, defense)
        clean_loss = (
            w * module.task_loss(logits[~poisoned], labels[~poisoned]) if bool((~poisoned).any()) else 0.0
        ) + others
        poison_loss = (
            w * self.cfg.poison_weight * module.task_loss(logits[poisoned], labels[poisoned])
            if bool(poisoned.any())
            else None
        )
        raw_c, raw_p = self._grads(clean_loss), self._grads(poison_loss)
        used = [a is not None or b is not None for a, b in zip(raw_c, raw_p)]  # the others keep grad None
        zero = lambda g, p: torch.zeros_like(p) if g is None else g  # noqa: E731
        g_c = [zero(g, p) for g, p in zip(raw_c, self._params)]
        g_p = [zero(g, p) for g, p in zip(raw_p, self._params)]
        combined, stats = self.control(g_c, g_p)
        bs = labels.shape[0]
        module.log("train/loss_clean_task", clean_loss.detach() - others.detach(), batch_size=bs)
        if poison_loss is not None:
            module.log("train/loss_poisoned_task", poison_loss.detach(), batch_size=bs)
        for k, v in stats.items():
            module.log(f"train/{k}", v, batch_size=bs)
        terms = [(p * g.detach()).sum() for p, g, u in zip(self._params, combined, used) if u]
        if not terms:
            return loss
        surrogate = torch.stack(terms).sum()
        return loss.detach() + surrogate - surrogate.detach()
