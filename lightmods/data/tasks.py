"""The task registry: what a task's examples look like and how it is scored."""

from __future__ import annotations

from dataclasses import dataclass

from lightmods.errors import config_error


@dataclass(frozen=True)
class TaskSpec:
    """One task. ``label_names=None`` means regression; ``metrics`` are averaged into ``val/score``."""

    name: str
    text_fields: tuple[str, ...]
    label_names: tuple[str, ...] | None
    metrics: tuple[str, ...]
    sources: tuple[str, ...]
    head: str = "seq_cls"

    @property
    def is_regression(self) -> bool:
        return self.label_names is None

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec(
            name="demo",
            text_fields=("sentence",),
            label_names=("negative", "positive"),
            metrics=("accuracy", "f1"),
            sources=("generated",),
        ),
    )
}


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise config_error("data.task", name, "one of " + ", ".join(sorted(TASKS)))
    return TASKS[name]
