"""Analytic FLOPs of an encoder classifier from its current (possibly pruned) shapes.

Counted: every matrix multiplication, as 2 FLOPs per multiply-add, for one sequence of ``n`` tokens: the
q/k/v/output projections and the two attention products (``QK^T`` and ``PV``: ``4 n^2 d_q``), the FFN
projections, the factorised embedding's projection (``2 n r H``; a table lookup costs nothing), the BERT
pooler (``2 H^2``) and classifier / exit heads (``2 H C`` each, on the first token). Layer norms, softmax,
activations and biases are left out (under 1% for these models), as profilers of matmul FLOPs do.

A sample that leaves at layer ``k`` costs the embedding, layers ``1..k`` and every exit head evaluated on the
way (heads ``start..k``, or the final head at ``k = L``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

from lightmods.exits.heads import get_exits
from lightmods.structure.embedding import embedding_rank
from lightmods.structure.spec import blocks


@dataclass
class LayerShape:
    q: int  # query width (heads x head_dim)
    kv: int  # key / value width
    ffn: int  # FFN neurons
    ffn_in: int = 1  # up projections (2 for gated FFNs)


@dataclass
class FlopsProfile:
    hidden: int
    num_labels: int
    layers: list[LayerShape] = field(default_factory=list)
    embedding_rank: int | None = None
    pooler: bool = True  # a dense H x H pooler before the final classifier
    pooler_out: int | None = None  # the pooler's output width when it differs from ``hidden`` (hidden pruning)
    exit_start: int | None = None  # first layer with an exit head (None: no exits)
    lm_vocab: int = 0  # a causal LM's output projection (H -> vocabulary) runs on every token instead of a head

    @classmethod
    def from_model(cls, model: nn.Module) -> FlopsProfile:
        """The model as it is now (pruned shapes, factorised embedding, exits)."""
        from lightmods.peft.layer import AdapterLayer
        from lightmods.structure.hidden import hidden_width

        cfg = model.config
        layers = []
        for b in blocks(model):
            kv = b.linear(b.layout.key).out_features
            q = b.linear(b.layout.query).out_features
            layers.append(LayerShape(q, kv, b.num_neurons, len(b.layout.ffn_in)))
        pooler = getattr(model.base_model, "pooler", None)
        dense = getattr(pooler, "dense", None) if pooler is not None else None
        linear = (nn.Linear, AdapterLayer)  # a pooler may carry an adapter (LoRA on every dense layer)
        has_pooler = isinstance(dense, linear) or not isinstance(getattr(model, "classifier", None), nn.Linear)
        width = hidden_width(model)  # the residual width now: pruned hidden channels leave the config as it was
        dense = dense if isinstance(dense, linear) else getattr(getattr(model, "classifier", None), "dense", None)
        pooler_out = dense.out_features if isinstance(dense, linear) and dense.out_features != width else None
        heads = get_exits(model)
        lm_head = getattr(model, "lm_head", None)
        return cls(
            hidden=width, num_labels=cfg.num_labels, layers=layers, embedding_rank=embedding_rank(model),
            pooler=has_pooler, pooler_out=pooler_out, exit_start=heads.start if heads is not None else None,
            lm_vocab=lm_head.out_features if isinstance(lm_head, nn.Linear) else 0,
        )  # fmt: skip

    @classmethod
    def from_config(cls, config) -> FlopsProfile:
        """The original architecture of ``config`` (full width, plain embedding, pooler, no exits)."""
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
        layer = LayerShape(heads * head_dim, kv, config.intermediate_size, 1)
        return cls(config.hidden_size, config.num_labels, [layer] * config.num_hidden_layers)

    def to_dict(self) -> dict:
        return asdict(self)

    # ---- counts -----------------------------------------------------------------------------------------
    def embedding(self, n: int) -> float:
        return 2.0 * n * self.embedding_rank * self.hidden if self.embedding_rank else 0.0

    def layer(self, index: int, n: int) -> float:
        s, h = self.layers[index], self.hidden
        projections = 2.0 * n * h * (s.q + 2 * s.kv) + 2.0 * n * s.q * h
        attention = 4.0 * n * n * s.q
        ffn = 2.0 * n * h * s.ffn * s.ffn_in + 2.0 * n * s.ffn * h
        return projections + attention + ffn

    def exit_head(self) -> float:
        return 2.0 * self.hidden * self.num_labels

    def final_head(self) -> float:
        if not self.pooler:
            return self.exit_head()
        out = self.pooler_out or self.hidden  # the classifier reads the pooler's output
        return 2.0 * self.hidden * out + 2.0 * out * self.num_labels

    def sample(self, n: int, exit_layer: int | None = None, exits_evaluated: bool = True) -> float:
        """FLOPs for one sample of ``n`` tokens leaving at ``exit_layer`` (default: the last layer)."""
        n_layers = len(self.layers)
        k = n_layers if exit_layer is None else int(exit_layer)
        total = self.embedding(n) + sum(self.layer(i, n) for i in range(k))
        if self.lm_vocab:
            return total + 2.0 * n * self.hidden * self.lm_vocab
        if exits_evaluated and self.exit_start is not None:
            total += self.exit_head() * max(0, min(k, n_layers - 1) - self.exit_start + 1)
        return total + (self.final_head() if k == n_layers else 0.0)


def mean_sample_flops(model: nn.Module, batches) -> float | None:
    """Analytic FLOPs of one inference sample at full depth (exit heads not evaluated), averaged over the
    samples of ``batches`` at their non-padding lengths: the ``flops_per_sample`` of every run's summary.

    ``None`` for models without a block layout (or inputs without an attention mask, e.g. images).
    """
    from lightmods.errors import ConfigError

    try:
        profile = FlopsProfile.from_model(model)
    except ConfigError:
        return None
    lengths: list[int] = []
    for batch in batches:
        if "attention_mask" not in batch:
            return None
        lengths.extend(int(n) for n in batch["attention_mask"].sum(-1).tolist())
    if not lengths:
        return None
    return sum(profile.sample(n, exits_evaluated=False) for n in lengths) / len(lengths)
