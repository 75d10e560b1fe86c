"""Tasks (columns, labels, metrics, head), their loaders, the DataModule and the official metrics."""

from lightmods.data.datamodule import TextClassificationDataModule
from lightmods.data.metrics import TaskMetrics
from lightmods.data.tasks import TASKS, TaskSpec, get_task

__all__ = ["TASKS", "TaskMetrics", "TaskSpec", "TextClassificationDataModule", "get_task"]
