"""What kind of labels a classifier learns, decided once: :class:`MulticlassTask` (one class per image) or
:class:`MultilabelTask` (any number). Everything that depends on it asks the task (:mod:`.base`)."""

from transfer_lightning.errors import UserInputError
from transfer_lightning.tasks.base import Task, TaskMetrics, TaskName, TestReport
from transfer_lightning.tasks.classification_report import ClassificationReport
from transfer_lightning.tasks.multiclass import KNOWN_RATE, MulticlassTask
from transfer_lightning.tasks.multilabel import MultilabelReport, MultilabelTask

#: The task classes by the name configs, checkpoints and exported models use.
TASKS: dict[str, type[Task]] = {"multiclass": MulticlassTask, "multilabel": MultilabelTask}


def create_task(
    name: TaskName,
    class_names: list[str],
    threshold: float | None = None,
    calibrate: bool = True,
    known_rate: float | None = KNOWN_RATE,
) -> Task:
    """The task called ``name`` over ``class_names``; ``threshold`` fixes a multi-label task's thresholds,
    ``calibrate`` false keeps a multiclass task's temperature at 1, and ``known_rate`` is the share of validation
    images its threshold of "none of these" keeps (None: no threshold)."""
    if name == "multilabel":
        return MultilabelTask(class_names, threshold)
    return MulticlassTask(class_names, calibrate, known_rate)


def task_for_data(model_task: TaskName | None, threshold: float | None, data_task: TaskName) -> TaskName:
    """The model's task on data of ``data_task``: the data's when the model's is null; multi-label data for
    a multiclass model, or a threshold for a multiclass task, is refused in one line."""
    if model_task is None and data_task == "multiclass" and threshold is not None:
        raise UserInputError("model.threshold is the decision threshold of multilabel models; this one is multiclass.")
    if model_task == "multiclass" and data_task == "multilabel":
        raise UserInputError(
            "The data gives images several labels, but model.task is multiclass (one class per image): "
            "set --model.task multilabel (or leave it unset), or train on single-label data."
        )
    return model_task or data_task


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
    "task_for_data",
]
