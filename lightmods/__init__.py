"""lightmods: efficient fine-tuning and compression of pretrained transformers with Lightning + Hydra."""

__version__ = "0.1.0"
