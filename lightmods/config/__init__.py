"""Structured-config schemas for every config group, and their registration with Hydra."""

from lightmods.config.schema import (
    CallbacksConfig,
    DataConfig,
    LoggerConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainerConfig,
)
from lightmods.config.store import register_schemas, validate

__all__ = [
    "CallbacksConfig",
    "DataConfig",
    "LoggerConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "TrainerConfig",
    "register_schemas",
    "validate",
]
