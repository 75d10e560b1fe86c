"""Architecture specs: where attention heads, FFN neurons and hidden channels live in each supported family.

Every structural method (Light-PEFT, S2FT, COST-EFF, TransAct, ...) reads blocks through this one spec, so
adding a family here makes all of them work on it.

Attention is addressed in *units*: one key/value head together with the query heads that share it
(``num_heads / num_kv_heads`` of them). For multi-head attention a unit is one head; for grouped-query
attention (LLaMA-style decoders) pruning or permuting at unit granularity keeps the grouping valid.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from lightmods.errors import ConfigError


@dataclass(frozen=True)
class BlockLayout:
    """Module names inside one transformer block, per family."""

    block_pattern: str  # regex on full module names; group 1 is the layer index
    query: str
    key: str
    value: str
    attn_out: str
    ffn_in: tuple[str, ...]  # projections whose output rows are FFN neurons (up, and gate for GLU)
    ffn_out: str  # projection whose input columns are FFN neurons
    # Where the residual stream (hidden channels) lives outside q/k/v/FFN-in columns and attn/FFN-out rows:
    norms: tuple[str, ...] = ()  # in-block norms over the hidden width (relative to the block)
    embeddings: tuple[str, ...] = ()  # embedding tables whose columns are hidden channels (relative to the base model)
    base_norms: tuple[str, ...] = ()  # norms over the hidden width outside the blocks (relative to the base model)
    stream_readers: tuple[str, ...] = ()  # heads reading the last hidden state (name suffixes in the task model)


ENCODER_LAYOUT = BlockLayout(
    block_pattern=r"^(?:.*\.)?encoder\.layer\.(\d+)$",
    query="attention.self.query",
    key="attention.self.key",
    value="attention.self.value",
    attn_out="attention.output.dense",
    ffn_in=("intermediate.dense",),
    ffn_out="output.dense",
    norms=("attention.output.LayerNorm", "output.LayerNorm"),  # post-LN: these produce the residual stream
    embeddings=("embeddings.word_embeddings", "embeddings.position_embeddings", "embeddings.token_type_embeddings"),
    base_norms=("embeddings.LayerNorm",),
    # BERT's pooler (its output is not the stream: the classifier after it keeps its width), RoBERTa's
    # classification head, span heads.
    stream_readers=("pooler.dense", "classifier.dense", "qa_outputs"),
)

DECODER_LAYOUT = BlockLayout(
    block_pattern=r"^(?:.*\.)?layers\.(\d+)$",
    query="self_attn.q_proj",
    key="self_attn.k_proj",
    value="self_attn.v_proj",
    attn_out="self_attn.o_proj",
    ffn_in=("mlp.gate_proj", "mlp.up_proj"),
    ffn_out="mlp.down_proj",
    norms=("input_layernorm", "post_attention_layernorm"),  # pre-norm: the stream itself is never normalised
    embeddings=("embed_tokens",),
    base_norms=("norm",),
    stream_readers=("score", "lm_head", "qa_outputs"),
)

# Readers of the residual stream any family may carry: exit classifiers after each layer (``exits``).
COMMON_STREAM_READERS = (r"re:(.*\.)?exit_heads\.heads\.\d+\.linear",)

LAYOUTS = {"bert": ENCODER_LAYOUT, "roberta": ENCODER_LAYOUT, "llama": DECODER_LAYOUT}


@dataclass
class Block:
    """One transformer block of a live model: its index, module and the attention geometry."""

    index: int
    name: str
    module: nn.Module
    layout: BlockLayout
    head_dim: int
    group: int  # query heads per key/value head

    def linear(self, rel: str) -> nn.Module:
        return self.module.get_submodule(rel)

    @property
    def num_units(self) -> int:
        """Attention units (key/value heads) this block has now."""
        return self.linear(self.layout.key).out_features // self.head_dim

    @property
    def num_heads(self) -> int:
        return self.num_units * self.group

    @property
    def num_neurons(self) -> int:
        return self.linear(self.layout.ffn_out).in_features

    def full_name(self, rel: str) -> str:
        return f"{self.name}.{rel}"


def layout_of(model: nn.Module) -> BlockLayout:
    from lightmods.models.families import family_of

    family = family_of(model)
    if family.name not in LAYOUTS:
        raise ConfigError(
            f"model family {family.name!r} has no block layout for structural methods; accepted: {', '.join(sorted(LAYOUTS))}"
        )
    return LAYOUTS[family.name]


def blocks(model: nn.Module) -> list[Block]:
    """The transformer blocks of ``model`` in layer order."""
    layout = layout_of(model)
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    pattern = re.compile(layout.block_pattern)
    found = []
    for name, module in model.named_modules():
        m = pattern.match(name)
        if m:
            found.append(Block(int(m.group(1)), name, module, layout, head_dim, heads // kv_heads))
    if not found:
        raise ConfigError(
            f"no transformer blocks matching {layout.block_pattern!r} in a {config.model_type} model"
        )
    return sorted(found, key=lambda b: b.index)
