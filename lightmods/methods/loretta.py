"""LoRETTA (Yang et al., NAACL 2024): tensor-train LoRA (``method=loretta_rep``) and tensor-train
bottleneck adapters (``method=loretta_adp``). See :mod:`lightmods.peft.loretta` for the layers and the
initialization choice."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lightmods.config import checks
from lightmods.errors import config_error
from lightmods.methods.base import AdapterMethod, AdapterMethodConfig, register_method
from lightmods.methods.lora import LoRA, LoraConfig
from lightmods.models.families import Family
from lightmods.peft import mark_trainable
from lightmods.peft.bottleneck import ACTIVATIONS
from lightmods.peft.inject import inject_adapters
from lightmods.peft.loretta import LorettaAdapter, LorettaRepLinear
from lightmods.peft.tensor_train import TT_INITS


@dataclass
class LorettaRepConfig(LoraConfig):
    """LoRA's keys plus ``tensor_rank`` (the inner TT rank) and ``init`` (``zero``: start at the base
    model; ``gaussian``: the official initialization). ``dropout`` 0.05 as in the official scripts."""

    name: str = "loretta_rep"
    dropout: float = 0.05
    tensor_rank: int = 5
    init: str = "zero"

    def __post_init__(self):
        super().__post_init__()
        checks.positive("method.tensor_rank", self.tensor_rank)
        checks.one_of("method.init", self.init, TT_INITS)


@register_method
class LorettaRep(LoRA):
    """Tensor-train LoRA on the LoRA targets (the family's default: query/value, q_proj/v_proj)."""

    name = "loretta_rep"
    Config = LorettaRepConfig

    def make_layer(self, linear: nn.Linear) -> LorettaRepLinear:
        c = self.config
        return LorettaRepLinear(
            linear, rank=c.rank, alpha=c.alpha, dropout=c.dropout, tensor_rank=c.tensor_rank, init=c.init
        )


# The official placement (``TRANSFORMERS_MODELS_TO_ADAPTER_TYPE_MAPPING``) for decoders: adapters on the
# input of the gate and up projections ("mh_adapter") and on the output of the down projection.
_INPUT_TARGETS = {"llama": ("gate_proj", "up_proj")}
_OUTPUT_TARGETS = {"llama": ("down_proj",)}


@dataclass
class LorettaAdpConfig(AdapterMethodConfig):
    """``target_modules`` get adapters on their output, ``input_target_modules`` on their input; both
    ``null`` = the official placement (encoders: attention-output and FFN-output projections; LLaMA:
    input of gate_proj/up_proj, output of down_proj). Defaults as in the official BERT-family scripts."""

    name: str = "loretta_adp"
    lr: float = 1e-3
    input_target_modules: list[str] | None = None
    bottleneck_dim: int = 64
    tensor_rank: int = 5
    activation: str = "relu"
    scaling: float = 1.0
    dropout: float = 0.0
    init: str = "zero"

    def __post_init__(self):
        super().__post_init__()
        checks.positive("method.bottleneck_dim", self.bottleneck_dim)
        checks.positive("method.tensor_rank", self.tensor_rank)
        checks.one_of("method.activation", self.activation, sorted(ACTIVATIONS))
        checks.ratio("method.dropout", self.dropout)
        checks.one_of("method.init", self.init, TT_INITS)


@register_method
class LorettaAdp(AdapterMethod):
    """Tensor-train bottleneck adapters, placed as the official code places them."""

    name = "loretta_adp"
    Config = LorettaAdpConfig

    def default_targets(self, family: Family) -> tuple[str, ...]:
        return _OUTPUT_TARGETS.get(family.name, family.adapter_targets.get("houlsby", ()))

    def default_input_targets(self, family: Family) -> tuple[str, ...]:
        return _INPUT_TARGETS.get(family.name, ())

    def make_layer(self, linear: nn.Linear, position: str = "output") -> LorettaAdapter:
        c = self.config
        return LorettaAdapter(
            linear, bottleneck_dim=c.bottleneck_dim, tensor_rank=c.tensor_rank, activation=c.activation,
            scaling=c.scaling, dropout=c.dropout, position=position, init=c.init,
        )  # fmt: skip

    def prepare(self, model: nn.Module, family: Family) -> nn.Module:
        c = self.config
        self.family = family
        outputs = (
            list(c.target_modules) if c.target_modules is not None else list(self.default_targets(family))
        )
        inputs = (
            list(c.input_target_modules)
            if c.input_target_modules is not None
            else list(self.default_input_targets(family))
        )
        if not outputs and not inputs:
            raise config_error(
                "method.target_modules",
                c.target_modules,
                f"module-name patterns (no default placement for the {family.name} family)",
            )
        exclude = [*c.exclude_modules, *family.head_modules]
        self.injected = []
        if outputs:
            self.injected += inject_adapters(model, outputs, self.make_layer, exclude=exclude)
        if inputs:
            factory = lambda linear: self.make_layer(linear, position="input")  # noqa: E731
            self.injected += inject_adapters(
                model, inputs, factory, exclude=exclude, key="method.input_target_modules"
            )
        mark_trainable(model, head_patterns=self.head_patterns())
        return model
