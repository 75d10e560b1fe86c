"""Token reduction for vision transformers: layers that shorten the token sequence as it goes through the
model (EViT's keep-and-fuse reorganisation), keep-rate schedules, and the token counts they lead to."""

from lightmods.tokens.evit import (
    EViTLayer,
    default_layers,
    evit_layers,
    reorganize,
    set_train_keep_rate,
    token_counts,
    wrap_vit_layers,
)
from lightmods.tokens.schedule import SCHEDULES, keep_rate_at

__all__ = [
    "SCHEDULES",
    "EViTLayer",
    "default_layers",
    "evit_layers",
    "keep_rate_at",
    "reorganize",
    "set_train_keep_rate",
    "token_counts",
    "wrap_vit_layers",
]
