"""Every method as a ``method=<name>`` option. Importing this package registers them all."""

from lightmods.methods import adapter, cost_eff, full_ft, gs_lora, light_peft, lora, loretta, moslora, s2ft  # noqa: F401  (registration)
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
