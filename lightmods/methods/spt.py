"""SPT (Gui et al., arXiv 2312.10365, "SPT: Fine-Tuning Transformer-based Language Models Efficiently with
Sparsification"): LoRA fine-tuning on a sparsified model, trained end to end.

- Sparse MHA (``lightmods/spt/attention.py``): queries and keys are product-quantised with per-layer
  codebooks learned online (k-means by EMA); each query attends only to the ``key_fraction`` of keys with the
  largest PQ-estimated ``q . k`` (the official default keeps L/8: ``key_fraction=0.125``), computed with
  gathers so that attention memory scales with the kept fraction. Padding and causal masks are respected.
- Routed FFN (``lightmods/spt/ffn.py``): the FFN inner dimension is cut into ``ffn_blocks`` blocks; a linear
  router over the token's hidden state picks ``active_blocks`` of them per token (official: 4 blocks, half
  active) and only those are computed; the block outputs are scaled by ``2 * sigmoid(logit)``, which trains
  the router with the task loss.
- LoRA (``lightmods.peft.LoraLinear``) on ``target_modules`` (default: the family's LoRA targets, query and
  value, so SPT and ``method=lora`` train the same adapters; the paper puts LoRA on every linear layer, which
  ``target_modules`` also takes: LoRA on FFN projections is then restricted to the active blocks).

Works on the block layouts of ``lightmods/structure/spec.py`` (BERT-style encoders, LLaMA-style decoders).
Exports hold the merged adapters, the routers and codebooks (``model.safetensors``); ``load_export``
rebuilds SPT from the saved run config and loads them, giving the same outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lightmods.config import checks
from lightmods.errors import config_error
from lightmods.methods.base import AdapterMethodConfig, Method, register_method
from lightmods.models.families import Family
from lightmods.peft import LoraLinear, inject_adapters, mark_trainable
from lightmods.peft.inject import _parent
from lightmods.spt import attention as spt_attention
from lightmods.spt.attention import SPT_ATTENTION, SparseAttentionState
from lightmods.spt.ffn import GATES, BlockRouter, RoutedGatedMLP, RoutedIntermediate, RoutedOutput
from lightmods.structure.spec import Block, blocks, layout_of


def _fraction(key: str, value) -> None:
    if value is None or not (0 < value <= 1):
        raise config_error(key, value, "a number in (0, 1]")


@dataclass
class SptConfig(AdapterMethodConfig):
    name: str = "spt"
    lr: float = 5e-4
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    sparse_attention: bool = True
    key_fraction: float = 0.125  # keys kept per query (official: L / 8)
    codeword_dim: int = 8  # sub-vector size of the product quantizer (official: 8)
    codebook_size: int = 16  # codewords per subspace (official: 16)
    codebook_decay: float = 0.99  # EMA decay of the online k-means
    routed_ffn: bool = True
    ffn_blocks: int = 4  # official: 4
    active_blocks: int = 2  # official: half of the blocks
    router_gate: str = "scaled_sigmoid"  # | straight_through
    router_init_std: float = 1e-3  # small: every block scale starts near 1
    compare_steps: int = 2  # summary: time/memory of this many steps of SPT vs plain LoRA (0 = skip)
    compare_batch: int = 8
    compare_length: int = 128

    def __post_init__(self):
        super().__post_init__()
        checks.positive("method.rank", self.rank)
        checks.positive("method.alpha", self.alpha)
        checks.ratio("method.dropout", self.dropout)
        _fraction("method.key_fraction", self.key_fraction)
        checks.positive("method.codeword_dim", self.codeword_dim)
        if self.codebook_size is None or self.codebook_size < 2:
            raise config_error("method.codebook_size", self.codebook_size, "an integer >= 2")
        checks.ratio("method.codebook_decay", self.codebook_decay)
        checks.positive("method.ffn_blocks", self.ffn_blocks)
        if self.active_blocks is None or not (1 <= self.active_blocks <= self.ffn_blocks):
            raise config_error("method.active_blocks", self.active_blocks, f"an integer in [1, method.ffn_blocks={self.ffn_blocks}]")
        checks.one_of("method.router_gate", self.router_gate, GATES)
        checks.non_negative("method.router_init_std", self.router_init_std)
        checks.non_negative("method.compare_steps", self.compare_steps)
        checks.positive("method.compare_batch", self.compare_batch)
        checks.positive("method.compare_length", self.compare_length)
        if not (self.sparse_attention or self.routed_ffn):
            raise config_error("method.sparse_attention", self.sparse_attention, "true when method.routed_ffn is false (nothing would be sparse: use method=lora)")


def _wrap_ffn(blk: Block, router: BlockRouter) -> None:
    """Swap the block's FFN modules for routed ones that adopt the original children (names unchanged)."""
    lay = blk.layout
    parents = {rel.rpartition(".")[0] for rel in (*lay.ffn_in, lay.ffn_out)}
    if len(parents) == 1:  # gated MLP in one module (LLaMA: mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        gate, up = (rel.rpartition(".")[2] for rel in lay.ffn_in)
        parent, child = _parent(blk.module, parents.pop())
        setattr(parent, child, RoutedGatedMLP(getattr(parent, child), gate, up, lay.ffn_out.rpartition(".")[2], router))
    else:  # encoder: intermediate (dense + activation) then output (dense, dropout, LayerNorm)
        inter, _ = _parent(blk.module, lay.ffn_in[0])
        out, _ = _parent(blk.module, lay.ffn_out)
        p, c = _parent(blk.module, lay.ffn_in[0].rpartition(".")[0])
        setattr(p, c, RoutedIntermediate(inter, router))
        p, c = _parent(blk.module, lay.ffn_out.rpartition(".")[0])
        setattr(p, c, RoutedOutput(out))


@register_method
class SPT(Method):
    name = "spt"
    Config = SptConfig

    def prepare(self, model: nn.Module, family: Family) -> nn.Module:
        c = self.config
        self.family = family
        layout_of(model)  # a family without a block layout (e.g. ViT) fails here, naming the family
        model_blocks = blocks(model)
        self.original_attn = model.config._attn_implementation or "sdpa"
        if c.sparse_attention and model_blocks[0].head_dim % c.codeword_dim:
            raise config_error("method.codeword_dim", c.codeword_dim, f"a divisor of the head size {model_blocks[0].head_dim}")
        if c.routed_ffn:
            width = model_blocks[0].num_neurons
            if width % c.ffn_blocks:
                raise config_error("method.ffn_blocks", c.ffn_blocks, f"a divisor of the FFN width {width}")
        targets = list(c.target_modules) if c.target_modules else list(family.lora_targets)
        self.injected = inject_adapters(
            model, targets, lambda lin: LoraLinear(lin, rank=c.rank, alpha=c.alpha, dropout=c.dropout),
            exclude=[*c.exclude_modules, *family.head_modules],
        )  # fmt: skip
        mark_trainable(model, head_patterns=self.head_patterns())
        for blk in model_blocks:
            if c.sparse_attention:
                attn = blk.module.get_submodule(blk.layout.query.rpartition(".")[0])
                attn.spt_attn = SparseAttentionState(blk.head_dim, c.key_fraction, c.codeword_dim, c.codebook_size, c.codebook_decay)
                attn.spt_attn.to(blk.linear(blk.layout.query).weight.device)
            if c.routed_ffn:
                ref = blk.linear(blk.layout.ffn_out).weight
                router = BlockRouter(model.config.hidden_size, c.ffn_blocks, c.active_blocks, c.router_gate, c.router_init_std, ref)
                _wrap_ffn(blk, router)
                router.requires_grad_(True)
        if c.sparse_attention:
            spt_attention.register()
            model.config._attn_implementation = SPT_ATTENTION
        from lightmods.export import MERGE_ON_EXPORT

        setattr(model, MERGE_ON_EXPORT, True)  # export: merged adapters + SPT modules, rebuilt by load_export
        return model

    def summary(self, model: nn.Module) -> dict:
        c = self.config
        acc = super().summary(model)
        routers = [m for m in model.modules() if isinstance(m, BlockRouter)]
        states = [m for m in model.modules() if isinstance(m, SparseAttentionState)]
        acc["adapted_modules"] = len(self.injected)
        info = {
            "sparse_attention_layers": len(states),
            "key_fraction": c.key_fraction if states else 1.0,
            "codebook": {"subspaces": states[0].pq.subspaces, "codeword_dim": c.codeword_dim, "codewords": c.codebook_size} if states else None,
            "routed_ffn_layers": len(routers),
            "ffn_blocks": c.ffn_blocks if routers else None,
            "active_blocks": c.active_blocks if routers else None,
            "ffn_compute_fraction": c.active_blocks / c.ffn_blocks if routers else 1.0,
            "router_params": sum(p.numel() for r in routers for p in r.parameters()),
            "lora_params": sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n),
        }  # fmt: skip
        if c.compare_steps:
            from lightmods.spt.measure import compare_with_lora

            info["vs_lora"] = compare_with_lora(model, self.original_attn, c.compare_batch, c.compare_length, c.compare_steps)
        acc["spt"] = info
        return acc
