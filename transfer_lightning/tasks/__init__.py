"""What kind of labels a classifier learns, decided once: :class:`MulticlassTask` (one class per image) or
:class:`MultilabelTask` (any number). Everything that depends on it asks the task (:mod:`.base`)."""

from transfer_lightning.tasks.base import Task, TaskMetrics, TaskName, TestReport
from transfer_lightning.tasks.multiclass import ClassificationReport, MulticlassTask
from transfer_lightning.tasks.multilabel import MultilabelReport, MultilabelTask

#: The task classes by the name configs, checkpoints and exported models use.
TASKS: dict[str, type[Task]] = {"multiclass": MulticlassTask, "multilabel": MultilabelTask}


def create_task(name: TaskName, class_names: list[str], threshold: float | None = None) -> Task:
    """The task called ``name`` over ``class_names``; ``threshold`` fixes a multi-label task's thresholds."""
    if name == "multilabel":
        return MultilabelTask(class_names, threshold)
    return TASKS[name](class_names)


__all__ = [
    "TASKS",
    "ClassificationReport",
    "MulticlassTask",
    "MultilabelReport",
    "MultilabelTask",
    "Task",
    "TaskMetrics",
    "TaskName",
    "TestReport",
    "create_task",
]
