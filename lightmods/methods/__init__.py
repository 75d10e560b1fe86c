"""Every method as a ``method=<name>`` option. Importing this package registers them all."""

from lightmods.methods import (  # noqa: F401  (registration)
    adapter,
    cost_eff,
    evit,
    full_ft,
    gs_lora,
    light_peft,
    lora,
    loretta,
    mask_prune,
    moslora,
    pat,
    quant,
    s2ft,
    spt,
    transact,
    wid,
)
from lightmods.methods.base import (
    METHODS,
    AdapterMethod,
    AdapterMethodConfig,
    LossTerm,
    Method,
    MethodConfig,
    build_method,
    register_method,
)

__all__ = ["METHODS", "AdapterMethod", "AdapterMethodConfig", "LossTerm", "Method", "MethodConfig", "build_method", "register_method"]
