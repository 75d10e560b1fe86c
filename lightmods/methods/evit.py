"""EViT (Liang et al., ICLR 2022, "Not All Patches are What You Need"): token reorganisation for ViTs.

In the chosen layers (default: the paper's blocks 4, 7, 10 of 12, scaled to the model's depth), after
attention, the image tokens the [CLS] token attends to most are kept (``keep_rate`` of them) and the rest
are fused into one token weighted by their [CLS] attention; later computation runs on the shorter
sequence. No parameters are added; the whole model fine-tunes (as the paper's fine-tuning from DeiT), while
a :class:`KeepRateSchedule` lowers the keep rate from 1 to its target over the first epochs.

The layers are in ``lightmods/tokens/evit.py``. The prepared model's weights are a plain ViT's, so the export
is a plain transformers ViT and :func:`lightmods.export.load_export` re-applies the reorganisation from the
run config saved next to it (``export_reapplies``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lightmods.callbacks.keep_rate import KeepRateSchedule
from lightmods.config import checks
from lightmods.errors import config_error
from lightmods.exits.flops import FlopsProfile
from lightmods.methods.base import Method, MethodConfig, register_method
from lightmods.models.families import Family
from lightmods.tokens import SCHEDULES, default_layers, token_counts, wrap_vit_layers


@dataclass
class EViTConfig(MethodConfig):
    """``layers``: 0-based indices of the reorganising layers (null: ``depth/4, depth/2, 3*depth/4``, the
    paper's 4th, 7th and 10th of 12). ``keep_rate``: fraction of image tokens kept in each of them.
    ``fuse_inattentive``: fuse the dropped tokens into one (false: drop them; the paper's ablation).
    ``fuse_normalize``: divide the fused token by the summed attention (the official code does not).
    Schedule: 1.0 for ``shrink_start_epoch`` epochs, then ``schedule`` (cosine | linear) down to
    ``keep_rate`` over ``shrink_epochs`` epochs (fractions allowed; updated every optimizer step);
    ``schedule=none`` trains at ``keep_rate`` from the start (the official fine-tuning recipe)."""

    name: str = "evit"
    lr: float = 2e-5  # the official fine-tuning recipe (finetune.sh)
    keep_rate: float = 0.7
    layers: list[int] | None = None
    fuse_inattentive: bool = True
    fuse_normalize: bool = False
    schedule: str = "cosine"
    shrink_start_epoch: float = 0.0
    shrink_epochs: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if not (0 < self.keep_rate <= 1):
            raise config_error("method.keep_rate", self.keep_rate, "a number in (0, 1]")
        if self.layers is not None:
            layers = list(self.layers)
            if not layers or any(not isinstance(i, int) or i < 0 for i in layers) or len(set(layers)) != len(layers):
                raise config_error("method.layers", layers, "null or a non-empty list of distinct 0-based layer indices")
        checks.one_of("method.schedule", self.schedule, SCHEDULES)
        checks.non_negative("method.shrink_start_epoch", self.shrink_start_epoch)
        checks.non_negative("method.shrink_epochs", self.shrink_epochs)


@register_method
class EViT(Method):
    name = "evit"
    Config = EViTConfig
    export_reapplies = True  # parameter-free change of a plain ViT: re-applied on export reload

    def prepare(self, model: nn.Module, family: Family) -> nn.Module:
        c = self.config
        self.family = family
        model_type = getattr(model.config, "model_type", None)
        if family.name != "vit":
            raise config_error(
                "method", "evit", f"a ViT image classifier as the model (model_type vit); this model is {model_type!r} ({type(model).__name__})"
            )
        depth = model.config.num_hidden_layers
        layers = list(c.layers) if c.layers is not None else default_layers(depth)
        bad = [i for i in layers if i >= depth]
        if bad:
            raise config_error("method.layers", list(c.layers), f"layer indices in 0..{depth - 1} (the model has {depth} layers)")
        self.layers = wrap_vit_layers(model, layers, c.keep_rate, c.fuse_inattentive, c.fuse_normalize)
        model.requires_grad_(True)  # all weights train, as the paper's fine-tuning
        return model

    def callbacks(self):
        c = self.config
        return [KeepRateSchedule(c.keep_rate, c.shrink_start_epoch, c.shrink_epochs, c.schedule)]

    def summary(self, model: nn.Module) -> dict:
        cfg = model.config
        patches = (cfg.image_size // cfg.patch_size) ** 2
        counts = token_counts(patches, cfg.num_hidden_layers, self.layers, self.config.keep_rate, self.config.fuse_inattentive)
        flops = vit_flops(cfg, counts)
        full = vit_flops(cfg, [patches + 1] * cfg.num_hidden_layers)
        return {
            **super().summary(model),
            "evit_layers": self.layers,
            "evit_keep_rate": self.config.keep_rate,
            "evit_tokens_per_layer": counts,
            "evit_flops_per_image": round(flops),
            "evit_flops_ratio": round(flops / full, 4),
        }


def vit_flops(config, counts: list[int]) -> float:
    """Analytic matmul FLOPs of one image through a ViT whose layer ``i`` passes on ``counts[i]`` tokens:
    the patch projection, per layer attention on the tokens it receives and the FFN on those it keeps, and
    the classifier (``FlopsProfile``'s counting rules)."""
    profile = FlopsProfile.from_config(config)
    h, channels, p = config.hidden_size, config.num_channels, config.patch_size
    patches = (config.image_size // p) ** 2
    total = 2.0 * patches * channels * p * p * h + profile.exit_head()
    n_in = patches + 1
    for i, n_out in enumerate(counts):
        s = profile.layers[i]
        ffn_per_token = 2.0 * h * s.ffn * s.ffn_in + 2.0 * s.ffn * h
        total += profile.layer(i, n_in) + ffn_per_token * (n_out - n_in)  # the FFN runs on the kept tokens
        n_in = n_out
    return total
