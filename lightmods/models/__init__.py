"""Backbones: HF models with a task head, loaded from the hub, a local folder or a package, or built
randomly from a config; and the model families whose layout the methods know."""

from lightmods.models.backbone import build_backbone, build_tokenizer, model_max_positions, resolve_path
from lightmods.models.families import FAMILIES, Family, family_of

__all__ = ["FAMILIES", "Family", "build_backbone", "build_tokenizer", "family_of", "model_max_positions", "resolve_path"]
