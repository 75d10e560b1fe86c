"""SPT (Gui et al., arXiv 2312.10365): sparse multi-head attention with product-quantised key selection and
a routed FFN, used with LoRA by ``method=spt`` (``lightmods/methods/spt.py``)."""

from lightmods.spt.attention import (
    SPT_ATTENTION,
    SparseAttentionFunction,
    SparseAttentionState,
    select_keys,
    sparse_attention,
)
from lightmods.spt.ffn import BlockRouter, RoutedGatedMLP, RoutedIntermediate, RoutedOutput
from lightmods.spt.quantizer import ProductQuantizer

__all__ = [
    "SPT_ATTENTION", "BlockRouter", "ProductQuantizer", "RoutedGatedMLP", "RoutedIntermediate", "RoutedOutput",
    "SparseAttentionFunction", "SparseAttentionState", "select_keys", "sparse_attention",
]  # fmt: skip
