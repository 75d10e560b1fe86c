"""LoRETTA (Yang, Zhou, Wong, Zhang; NAACL 2024): LoRA factors and bottleneck adapters whose weights are
tensor trains, for far fewer trainable parameters (official code: ``yifanycc/loretta``).

- ``LorettaRepLinear`` (LoRETTA_rep): ``y = W0 x + b + (alpha / r) * B_TT A_TT dropout(x)``, with
  ``A_TT: in -> r`` and ``B_TT: r -> out`` tensor-train linear layers without bias. Mergeable.
- ``LorettaAdapter`` (LoRETTA_adp): a sequential bottleneck adapter ``h + s * up_TT(act(down_TT(h)))``
  with TT down (``d -> b``) and up (``b -> d``) projections with biases, applied to the output of the
  wrapped linear layer (the official "output_adapter") or to its input (the official "mh_adapter").

TT shapes come from :func:`lightmods.peft.tensor_train.tt_shape` (the official table where it has the
size, a balanced factorization otherwise); every inner TT rank is ``tensor_rank``.

Initialization. The official code gives every core the Gaussian TT initialization, so neither method starts
at the base model: LoRETTA_rep starts with a small non-zero ``delta W`` (its LoRA ``reset_parameters`` is
commented out) and LoRETTA_adp's up projection is not zero (the BERT-style adapter init only touches
``nn.Linear``). ``init="zero"`` (the default here) keeps that Gaussian initialization but sets the *last core*
of ``B_TT`` (rep) or of ``up_TT`` and its bias (adp) to zero, so that ``B = 0`` / ``up = 0`` exactly as in LoRA
and bottleneck adapters and training starts at the base model; ``init="gaussian"`` reproduces the official
initialization.
"""

from __future__ import annotations

import torch
from torch import nn

from lightmods.peft.bottleneck import ACTIVATIONS
from lightmods.peft.layer import AdapterLayer
from lightmods.peft.tensor_train import TTLinear, tt_shape

ADAPTER_POSITIONS = ("output", "input")


class LorettaRepLinear(AdapterLayer):
    """LoRA with both factors in tensor-train format: ``y = W0 x + s * B A dropout(x)``, ``s = alpha / r``.

    ``lora_A`` (``in -> r``) has the TT shape of ``(in, r)``, ``lora_B`` (``r -> out``) that of ``(out, r)``,
    as in the official code. ``delta_weight`` contracts both trains, so merging is exact.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        tensor_rank: int = 5,
        init: str = "zero",
    ):
        super().__init__(base_layer)
        w = base_layer.weight
        self.rank, self.tensor_rank = rank, tensor_rank
        self.scaling = alpha / rank
        kw = dict(rank=tensor_rank, bias=False, device=w.device, dtype=w.dtype)
        self.lora_A = TTLinear(
            self.in_features, rank, tt_shape(self.in_features, rank), init="gaussian", **kw
        )
        self.lora_B = TTLinear(rank, self.out_features, tt_shape(self.out_features, rank), init=init, **kw)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def adapter_forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        return base_out + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.dense_weight() @ self.lora_A.dense_weight()) * self.scaling

    def extra_repr(self) -> str:
        return f"rank={self.rank}, tensor_rank={self.tensor_rank}, scaling={self.scaling:g}"


class LorettaAdapter(AdapterLayer):
    """A bottleneck adapter with tensor-train projections, ``z + s * up(act(down(dropout(z))))``.

    ``position="output"``: ``z`` is the wrapped layer's output (``y = h + adapter(h)``, ``h = W x + b``), as
    for the attention-output and FFN-output projections of encoders. ``position="input"``: ``z`` is its
    input (``y = W (x + adapter(x)) + b``), as the official code does for LLaMA's ``gate_proj``/``up_proj``.
    Both TT projections take the TT shape of ``(d, bottleneck)`` and have biases. Not mergeable.
    """

    mergeable = False

    def __init__(
        self,
        base_layer: nn.Linear,
        bottleneck_dim: int = 64,
        tensor_rank: int = 5,
        activation: str = "relu",
        scaling: float = 1.0,
        dropout: float = 0.0,
        position: str = "output",
        init: str = "zero",
    ):
        super().__init__(base_layer)
        if position not in ADAPTER_POSITIONS:
            raise ValueError(f"position={position!r}; accepted: one of {', '.join(ADAPTER_POSITIONS)}")
        w = base_layer.weight
        self.bottleneck_dim, self.tensor_rank = bottleneck_dim, tensor_rank
        self.position, self.scaling = position, scaling
        d = self.out_features if position == "output" else self.in_features
        shape = tt_shape(d, bottleneck_dim)
        kw = dict(rank=tensor_rank, bias=True, device=w.device, dtype=w.dtype)
        self.adapter_down = TTLinear(d, bottleneck_dim, shape, init="gaussian", **kw)
        self.adapter_act = ACTIVATIONS[activation]()
        self.adapter_up = TTLinear(bottleneck_dim, d, shape, init=init, **kw)
        self.adapter_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def _adapt(self, z: torch.Tensor) -> torch.Tensor:
        return (
            z + self.adapter_up(self.adapter_act(self.adapter_down(self.adapter_dropout(z)))) * self.scaling
        )

    def adapter_forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        return self._adapt(base_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.position == "input" and not self.merged:
            return self.base_layer(self._adapt(x))
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"position={self.position}, bottleneck_dim={self.bottleneck_dim}, tensor_rank={self.tensor_rank}, scaling={self.scaling:g}"
