"""The one place that knows what a kind of labels means: :class:`Task` and the metrics it makes.

A task is chosen once (as torchmetrics' ``Accuracy(task=...)``) and every other part of the package
asks it: the model for losses, probabilities, the flip average and metrics; export and serve for
probabilities and the labels they imply; predict, interpretation and the dashboards for names and
columns. None of them branches on the kind of labels.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Literal

import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

TaskName = Literal["multiclass", "multilabel"]


class TestReport(ABC):
    """What ``test`` found: scalars to log, a markdown report, and figures for TensorBoard."""

    @abstractmethod
    def scalars(self) -> dict[str, float]:
        """The ``test/...`` values to log (per-class ones only for classes with test images)."""

    @abstractmethod
    def to_markdown(self) -> str: ...

    def figures(self) -> dict[str, Any]:
        """TensorBoard figures by tag (the confusion matrix); none by default."""
        return {}


class TaskMetrics(nn.Module, ABC):
    """Training, validation and test metrics of one task, synchronised across processes under DDP."""

    @abstractmethod
    def training_update(self, logits: Tensor, labels: Tensor) -> dict[str, Metric]:
        """Update the training metrics with a batch; return them by logged name (logged per step and epoch)."""

    @abstractmethod
    def update(self, stage: Literal["val", "test"], logits: Tensor, labels: Tensor) -> dict[str, Metric]:
        """Update the metrics of ``stage`` with a batch; return those that Lightning should log for the epoch
        (so that callbacks see them in ``on_validation_epoch_end`` already)."""

    @abstractmethod
    def validation_end(self, task: Task, sanity_checking: bool) -> dict[str, float]:
        """The validation scores that need the whole split, by logged name; the metrics are reset."""

    @abstractmethod
    def test_end(self, task: Task) -> TestReport: ...


class Task(nn.Module, ABC):
    """The rules of one kind of labels. An ``nn.Module`` so that what a task learns on validation (the
    multi-label decision thresholds) is saved in checkpoints and travels into exported models."""

    name: ClassVar[TaskName]
    #: The score that picks the best checkpoint and heads every comparison: ``acc`` or ``mAP``.
    score: ClassVar[str]
    #: How people call that score, for plots and pages.
    score_title: ClassVar[str]
    #: One class per image: the (true, predicted) confusions of a test are pairs of classes.
    single_label: ClassVar[bool]
    #: The prediction table's column of an image's true label(s).
    true_column: ClassVar[str]
    #: Gives each image an unknown score (:meth:`unknown_scores`) and answers "none of these" above a threshold.
    answers_unknown: ClassVar[bool] = False

    def __init__(self, class_names: list[str]) -> None:
        super().__init__()
        self.class_names = list(class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def monitor(self) -> str:
        """The validation metric that picks the best checkpoint."""
        return f"val/{self.score}"

    @property
    def checkpoint_filename(self) -> str:
        """ModelCheckpoint's file name; metric names hold "/", so the name spells the metric out."""
        return f"best-epoch{{epoch:02d}}-val_{self.score}{{val/{self.score}:.4f}}"

    @property
    def delimiter(self) -> str:
        """Between class names in one cell: a space, or ``;`` when a class name holds a space."""
        return ";" if any(" " in name for name in self.class_names) else " "

    def join(self, chosen: Tensor) -> str:
        """The names of the classes marked in a 0/1 row, joined by :attr:`delimiter`."""
        return self.delimiter.join(n for n, c in zip(self.class_names, chosen.tolist(), strict=True) if c)

    def targets(self, labels: Tensor) -> Tensor:
        """0/1 targets (N, classes): class indices become one-hot rows, multi-label rows stay."""
        return labels if labels.ndim == 2 else F.one_hot(labels, self.num_classes)

    def label_text(self, label: Tensor) -> str:
        """An image's true label(s) as text."""
        return self.join(self.targets(label.unsqueeze(0))[0])

    @abstractmethod
    def probabilities(self, logits: Tensor) -> Tensor: ...

    def unknown_scores(self, logits: Tensor) -> Tensor | None:
        """(N,) how unlike any known class each image is (higher: less like any), or ``None`` for tasks without
        "none of these": a multi-label image with no class at or above its threshold is already given none."""
        return None

    @abstractmethod
    def flip_average(self, logits: Tensor, mirrored: Tensor) -> Tensor:
        """The logits whose probabilities are the mean of those of an image and of its mirror image, so that
        losses, metrics and exported models all see the same average."""

    @abstractmethod
    def training_loss(
        self, logits: Tensor, labels: Tensor, label_smoothing: float = 0.0, class_weights: Tensor | None = None
    ) -> Tensor: ...

    @abstractmethod
    def evaluation_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """The plain loss of each image (no smoothing, no class weights): comparable between runs."""

    @abstractmethod
    def chosen(self, probabilities: Tensor) -> Tensor:
        """0/1 (N, classes): the classes each image is given."""

    @abstractmethod
    def score_of(self, probabilities: Tensor, labels: Tensor) -> float:
        """The task's :attr:`score` (accuracy, or mAP) of a whole split's probabilities, as a fraction."""

    @abstractmethod
    def explained_class(self, labels: Tensor, probabilities: Tensor) -> Tensor:
        """(N,) the true class to explain in an image's activation map."""

    @abstractmethod
    def metrics(self) -> TaskMetrics: ...

    @abstractmethod
    def describe_output(self) -> dict[str, Any]:
        """What an exported model's JSON says of its output (read back by :meth:`load_output_description`)."""

    def load_output_description(self, output: dict[str, Any]) -> None:
        """Take what :meth:`describe_output` wrote (nothing for tasks that learn nothing on validation)."""

    @abstractmethod
    def prediction_header(self, top_k: int) -> list[str]:
        """The prediction table's columns after the image's own."""

    @abstractmethod
    def prediction_cells(self, probabilities: Tensor, top_k: int, unknown_score: float | None = None) -> list[str]:
        """One image's cells under :meth:`prediction_header` (``unknown_score``: of :meth:`unknown_scores`, when the
        model gives one)."""

    def answer(self, probabilities: Tensor, top_k: int, unknown_score: float | None = None) -> dict[str, Any]:
        """What the server answers for one image: the most probable class and the ``top_k``."""
        ranked = sorted(zip(probabilities.tolist(), self.class_names, strict=True), reverse=True)[:top_k]
        return {
            "class": ranked[0][1],
            "probability": ranked[0][0],
            "top_k": [{"class": c, "probability": p} for p, c in ranked],
        }

    @abstractmethod
    def dashboard(self) -> dict[str, Any]:
        """TensorBoard's Custom Scalars layout of a run."""

    def _dashboard(self, scores: list[str], title: str) -> dict[str, Any]:
        return {
            "training": {
                "loss (train, val)": ["Multiline", [r"train/loss_epoch", r"val/loss"]],
                title: ["Multiline", scores],
                "learning rate": ["Multiline", [r"lr-.*"]],
            }
        }


def percent(value: float) -> str:
    """A share as a percentage with one decimal, or n/a for NaN (an undefined per-class value)."""
    return "n/a" if value != value else f"{100 * value:.1f}%"
