"""PAT's Hybrid Sparsification Modules (Liu et al., AAAI 2025): a low-rank operator plus one globally shared,
trainable mask over hidden channels on every write into the residual stream, and their merge into the
adjacent linear layers followed by physical removal of the masked channels.

Placement (pre-norm decoders): the output of the token embedding and of every attention-output and FFN-output
projection (adapters included: the hook sits on the adapter layer), i.e. before each residual add. At each
site ``y = (x + W_up W_down x) * s * g`` with ``W_down`` (``rank x d``, Kaiming-uniform) and ``W_up``
(``d x rank``, zero) so training starts at the unchanged model, ``s`` the shared mask scale of
:class:`DimDownMask` and ``g`` a per-site channel scale (init 1, trained when the identity loss is on).
A removed channel (``s = 0``) is therefore zero everywhere in the residual stream.

Merge (:func:`merge_hsms`), with ``T = diag(s g) (I + W_up W_down)`` per site and ``s`` binarised: writer
weights ``W <- T W``, biases ``b <- T b`` and LoRA ``B <- T B`` (``T (W + c B A) = T W + c (T B) A``: LoRA
stays trainable and unmerged); the embedding ``E <- E T^T``. The kept channels are then sliced by the
structural core with RMS-norm rescaling (``PruningPlan(hidden=keep, rescale_rms=True)``), which is exact
because the removed channels are exactly zero in the stream. The official merge script leaves ``g`` out
(exact only when ``g ~ 1``); here it is folded. A word embedding tied to the output embedding gets a
mask-only site (``T = diag(s)``), so the tie survives the merge.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lightmods.peft.layer import AdapterLayer
from lightmods.peft.lora import LoraLinear
from lightmods.structure.spec import blocks, layout_of

HSM_ATTR = "pat_hsm"
FREEZE_AT = 0.8  # the mask is frozen (detached) from 0.8 G on, as the official schedule
CLAMP = 10.0  # the official sigmoid clamps exp(-z) at e^10: the scale never falls below ~4.5e-5 in training
BINARY_TEMPERATURE = 1e6


def clamped_sigmoid(z: torch.Tensor) -> torch.Tensor:
    """``1 / (1 + exp(min(-z, 10)))``: the official code's sigmoid (no gradient where ``-z > 10``)."""
    return 1.0 / (1.0 + torch.exp((-z).clamp(max=CLAMP)))


def temperature(step: int, horizon: int) -> float:
    """``tau(t) = 1 / (1 - ln(max(1, t)) / ln(G) + 1e-6)``, rising from 1 at ``t <= 1`` toward ``1e6`` at G."""
    return 1.0 / (1.0 - math.log(max(1, step)) / math.log(horizon) + 1e-6)


def mask_bias(step: int, horizon: int) -> float:
    """``max(0.5 - t / G, 0)``: lifts the scale to 1 at the start, gone by ``t = G / 2``."""
    return max(0.5 - step / horizon, 0.0)


class _BinarizeSTE(torch.autograd.Function):
    """``(m >= 0)`` forward, identity backward (straight-through estimator)."""

    @staticmethod
    def forward(ctx, m):
        return (m >= 0).to(m.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


class DimDownMask(nn.Module):
    """The globally shared trainable mask ``m`` (init 0) over ``d`` hidden channels and its schedule.

    At optimizer step ``t`` of the horizon ``G`` (``step``, a buffer saved with the model):
    ``s = sigmoid_c(tau(t) m) + bias(t)`` for ``t < int(0.8 G)``, then ``s = sigmoid_c(tau(int(0.8 G))
    m.detach()) + bias(t)`` (the mask is frozen); ``binary`` (inference) gives ``round(sigmoid_c(1e6 m))``,
    i.e. 1 exactly where ``m > 0``. At ``t = 0`` every ``s`` is 1: training starts from the unpruned model.
    """

    def __init__(self, width: int, horizon: int, target: int, device=None):
        super().__init__()
        self.mask = nn.Parameter(torch.zeros(width, dtype=torch.float32, device=device))
        self.horizon, self.target = int(horizon), int(target)
        self.register_buffer("step", torch.zeros((), dtype=torch.long, device=device))
        self.binary = False

    def scale(self) -> torch.Tensor:
        if self.binary:
            return binary_scale(self.mask)
        t, g = int(self.step), self.horizon
        frozen = int(g * FREEZE_AT)
        if t < frozen:
            return clamped_sigmoid(temperature(t, g) * self.mask) + mask_bias(t, g)
        return clamped_sigmoid(temperature(frozen, g) * self.mask.detach()) + mask_bias(t, g)

    def kept(self) -> list[int]:
        """Channels the binarised mask keeps."""
        return torch.nonzero(binary_scale(self.mask.detach()) > 0).flatten().tolist()

    def extra_repr(self) -> str:
        return f"width={self.mask.numel()}, target={self.target}, horizon={self.horizon}"


def binary_scale(mask: torch.Tensor) -> torch.Tensor:
    return clamped_sigmoid(BINARY_TEMPERATURE * mask).round()


class HSM(nn.Module):
    """One site: ``(x + up(down(x))) * s * g`` in float32 (the official HSMs are kept in fp32); ``rank = 0``
    is a mask-only site (tied embeddings)."""

    def __init__(self, width: int, rank: int, device=None):
        super().__init__()
        self.rank = rank
        if rank:
            self.down = nn.Linear(width, rank, bias=False, device=device, dtype=torch.float32)
            self.up = nn.Linear(rank, width, bias=False, device=device, dtype=torch.float32)
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.up.weight)
        self.scale = nn.Parameter(torch.ones(width, dtype=torch.float32, device=device), requires_grad=bool(rank))

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        h = x.float()
        if self.rank:
            h = h + self.up(self.down(h))
        return (h * s * self.scale).to(x.dtype)

    @torch.no_grad()
    def transform(self, s: torch.Tensor) -> torch.Tensor:
        """``T = diag(s g) (I + W_up W_down)`` in float64 (``d x d``)."""
        d = self.scale.numel()
        m = torch.eye(d, dtype=torch.float64, device=self.scale.device)
        if self.rank:
            m = m + self.up.weight.double() @ self.down.weight.double()
        return (s.double() * self.scale.double())[:, None] * m


class _SiteHook:
    """Forward hook of one site; a plain object, so ``copy.deepcopy`` of the model rebinds it to the copy."""

    def __init__(self, owner: HybridSparsification, key: str):
        self.owner, self.key = owner, key

    def __call__(self, module, args, out):
        return self.owner.sites[self.key](out, self.owner.mask.scale())


class HybridSparsification(nn.Module):
    """Every HSM of a model (``model.pat_hsm``) and the shared mask."""

    def __init__(self, model: nn.Module, rank: int, horizon: int, target: int):
        super().__init__()
        model_blocks = blocks(model)
        self.layout = layout_of(model)
        ref = model_blocks[0].linear(self.layout.query).weight
        width = ref.shape[1]
        self.mask = DimDownMask(width, horizon, target, device=ref.device)
        self.sites = nn.ModuleDict()
        self.tied = _embedding_tied(model)
        self.sites["embed"] = HSM(width, 0 if self.tied else rank, device=ref.device)
        for b in model_blocks:
            self.sites[f"layer{b.index}_attn"] = HSM(width, rank, device=ref.device)
            self.sites[f"layer{b.index}_ffn"] = HSM(width, rank, device=ref.device)
        self._handles: list = []

    def targets(self, model: nn.Module) -> dict[str, nn.Module]:
        """Site name -> the module whose output it transforms."""
        base = getattr(model, "base_model", model)
        out = {"embed": base.get_submodule(self.layout.embeddings[0])}
        for b in blocks(model):
            out[f"layer{b.index}_attn"] = b.linear(self.layout.attn_out)
            out[f"layer{b.index}_ffn"] = b.linear(self.layout.ffn_out)
        return out

    def attach(self, model: nn.Module) -> None:
        for key, module in self.targets(model).items():
            self._handles.append(module.register_forward_hook(_SiteHook(self, key)))

    def detach_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def low_rank_downs(self) -> list[torch.Tensor]:
        """``W_down`` of every site that has one (what the identity loss regularises)."""
        return [site.down.weight for site in self.sites.values() if site.rank]


def _embedding_tied(model: nn.Module) -> bool:
    base = getattr(model, "base_model", model)
    emb = base.get_submodule(layout_of(model).embeddings[0])
    return any(
        m is not emb and m._parameters.get("weight") is emb.weight for m in model.modules() if hasattr(m, "_parameters")
    )


def add_hsms(model: nn.Module, rank: int, horizon: int, target: int) -> HybridSparsification:
    hsm = HybridSparsification(model, rank, horizon, target)
    hsm.attach(model)
    setattr(model, HSM_ATTR, hsm)
    return hsm


def get_hsms(model: nn.Module) -> HybridSparsification | None:
    return getattr(model, HSM_ATTR, None)


def remove_hsms(model: nn.Module) -> None:
    hsm = get_hsms(model)
    if hsm is not None:
        hsm.detach_hooks()
        delattr(model, HSM_ATTR)


@torch.no_grad()
def _fold_writer(layer: nn.Module, t: torch.Tensor) -> None:
    """``W <- T W``, ``b <- T b`` (and LoRA ``B <- T B``) of a layer that writes into the stream."""
    if isinstance(layer, AdapterLayer) and not isinstance(layer, LoraLinear):
        raise NotImplementedError(f"cannot fold an HSM into a {type(layer).__name__} (LoRA or plain linear layers)")
    base = layer.base_layer if isinstance(layer, AdapterLayer) else layer
    if isinstance(layer, AdapterLayer) and layer.merged:
        raise RuntimeError("unmerge the adapter before merging the HSMs")
    params = [base.weight, base.bias, layer.lora_B.weight if isinstance(layer, LoraLinear) else None]
    for p in params:
        if p is not None:
            p.copy_((t.to(p.device) @ p.double().reshape(p.shape[0], -1)).reshape(p.shape).to(p.dtype))


@torch.no_grad()
def merge_hsms(model: nn.Module) -> list[int]:
    """Fold every HSM (with the mask binarised) into the layer it follows and drop the HSMs; returns the kept
    channels. The caller slices them with ``PruningPlan(hidden=kept, rescale_rms=True)``."""
    hsm = get_hsms(model)
    if hsm is None:
        raise RuntimeError("the model carries no HSMs")
    s = binary_scale(hsm.mask.mask.detach()).double()
    kept = hsm.mask.kept()
    for key, module in hsm.targets(model).items():
        t = hsm.sites[key].transform(s)
        if key == "embed":
            w = module.weight
            w.copy_((w.double() @ t.to(w.device).t()).to(w.dtype))  # rows are token vectors: e <- T e
        else:
            _fold_writer(module, t)
    remove_hsms(model)
    return kept
