"""Weight quantization for quantization-aware training (``method=quant``): the quantizer with a learnable
module-wise clipping factor, quantized layers that wrap their base layers, bit-packed export and reload."""

from lightmods.quant.layers import (
    QuantEmbedding,
    QuantLayer,
    QuantLinear,
    quant_layers,
    quantize_embeddings,
    quantize_linears,
)
from lightmods.quant.quantizer import (
    MAX_BITS,
    MIN_BITS,
    SCALE_INITS,
    WeightQuantizer,
    dequantize,
    fake_quantize,
    pack_codes,
    packed_nbytes,
    unpack_codes,
)

__all__ = [
    "MAX_BITS",
    "MIN_BITS",
    "SCALE_INITS",
    "QuantEmbedding",
    "QuantLayer",
    "QuantLinear",
    "WeightQuantizer",
    "dequantize",
    "fake_quantize",
    "pack_codes",
    "packed_nbytes",
    "quant_layers",
    "quantize_embeddings",
    "quantize_linears",
    "unpack_codes",
]
