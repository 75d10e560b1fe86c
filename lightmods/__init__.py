"""lightmods: efficient fine-tuning and compression of pretrained transformers with Lightning + Hydra."""

__version__ = "0.1.0"

# The config schemas first: `lightmods.config.schema` embeds `lightmods.attacks.config`, which uses
# `lightmods.config.checks`; importing the package here makes every entry point (`import lightmods.run`,
# `import lightmods.attacks`) resolve that cycle in the one order that works.
from lightmods import config as _config  # noqa: E402, F401
