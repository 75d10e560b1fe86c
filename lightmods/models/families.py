"""Where the parts methods care about live in each supported model family.

A method asks the family for defaults (which linear layers LoRA targets, where bottleneck adapters go,
which modules form the task head) so that its config can leave them unset.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from lightmods.errors import ConfigError

IMAGE_MODEL_TYPES = ("vit",)  # image classifiers: pixel_values in, no tokenizer
_ENC_ATTN_OUT = r"re:(.*\.)?layer\.\d+\.attention\.output\.dense"
_ENC_FFN_OUT = r"re:(.*\.)?layer\.\d+\.output\.dense"


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    head_modules: tuple[str, ...]
    lora_targets: tuple[str, ...]
    adapter_targets: dict[str, tuple[str, ...]] = field(default_factory=dict)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="bert",
            model_types=("bert",),
            # The pooler is part of BERT's classification path (tanh over [CLS]) and trains with the head.
            head_modules=("classifier", "pooler", "qa_outputs"),
            lora_targets=("query", "value"),
            adapter_targets={"houlsby": (_ENC_ATTN_OUT, _ENC_FFN_OUT), "pfeiffer": (_ENC_FFN_OUT,)},
        ),
        Family(
            name="roberta",
            model_types=("roberta", "xlm-roberta", "camembert", "deberta-v2", "electra"),
            head_modules=("classifier", "qa_outputs"),
            lora_targets=("query", "value"),
            adapter_targets={"houlsby": (_ENC_ATTN_OUT, _ENC_FFN_OUT), "pfeiffer": (_ENC_FFN_OUT,)},
        ),
        Family(
            name="vit",
            model_types=IMAGE_MODEL_TYPES,
            head_modules=("classifier",),
            lora_targets=("q_proj", "v_proj"),  # query and value (transformers 5 names them q_proj / v_proj)
            adapter_targets={"houlsby": ("attention.o_proj", "mlp.fc2"), "pfeiffer": ("mlp.fc2",)},
        ),
        Family(
            name="llama",
            model_types=("llama", "mistral", "qwen2", "qwen3"),
            head_modules=("score", "qa_outputs", "lm_head"),
            lora_targets=("q_proj", "v_proj"),
            adapter_targets={"houlsby": ("o_proj", "down_proj"), "pfeiffer": ("down_proj",)},
        ),
    )
}


def family_of(model: nn.Module) -> Family:
    """The family of an HF model, from ``config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    known = sorted(t for f in FAMILIES.values() for t in f.model_types)
    raise ConfigError(f"model_type={model_type!r} has no architecture spec; accepted model types: {', '.join(known)}")
