"""LightningModules."""

from lightmods.modules.task_module import TaskModule

__all__ = ["TaskModule"]
