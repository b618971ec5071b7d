"""Any number of classes per image: a sigmoid per class, binary cross-entropy, mean average precision, and
each class's decision threshold picked on validation; the test report gives per-class AP, F1 at those
thresholds, and the labels most often missed and invented.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.aggregation import CatMetric
from torchmetrics.functional.classification import (
    multilabel_average_precision,
    multilabel_f1_score,
    multilabel_precision,
    multilabel_precision_recall_curve,
    multilabel_recall,
    multilabel_stat_scores,
)

from transfer_lightning.tasks.base import Task, TaskMetrics, TestReport, percent
from transfer_lightning.tasks.calibration import multilabel_calibration_error

#: The decision thresholds a multi-label class's threshold is picked from on the validation set.
THRESHOLD_GRID = torch.linspace(0.01, 0.99, 99)
#: The threshold of a class that validation cannot pick one for (no positive validation image).
DEFAULT_THRESHOLD = 0.5
#: Classes listed as most often missed and most often invented in the multi-label report.
WORST_CLASSES = 5


@dataclass(frozen=True)
class MultilabelReport(TestReport):
    """Multi-label test metrics of one run; per-class values are NaN for classes without test positives
    (precision: never predicted). F1, precision and recall are at the per-class ``thresholds``."""

    class_names: list[str]
    average_precision: list[float]
    precision: list[float]
    recall: list[float]
    f1: list[float]
    support: list[int]
    thresholds: list[float]
    images: int
    #: Mean of ``average_precision`` over the classes with test positives.
    mean_average_precision: float
    macro_f1: float
    micro_f1: float
    #: (class, images) of the labels most often missed (false negatives) and invented (false positives).
    missed: list[tuple[str, int]]
    invented: list[tuple[str, int]]
    #: Expected calibration error of each label's probability, averaged over the labels.
    calibration_error: float = math.nan

    @property
    def present(self) -> list[bool]:
        return [count > 0 for count in self.support]

    def scalars(self) -> dict[str, float]:
        values = {
            "test/mAP": self.mean_average_precision,
            "test/f1_macro": self.macro_f1,
            "test/f1_micro": self.micro_f1,
            "test/ece": self.calibration_error,
        }
        for name, ap, present in zip(self.class_names, self.average_precision, self.present, strict=True):
            if present:
                values[f"test/AP_{name}"] = ap
        return values

    def to_markdown(self) -> str:
        lines = [
            "# Multi-label classification report",
            "",
            f"{self.images} test images, {sum(self.support)} labels; mAP {percent(self.mean_average_precision)} "
            f"(mean over the {sum(self.present)} classes with test images), at the decision thresholds "
            f"macro-F1 {percent(self.macro_f1)} and micro-F1 {percent(self.micro_f1)}; expected calibration error "
            f"{percent(self.calibration_error)} (each label's probability, 15 bins, averaged over the labels).",
            "",
            "| class | AP | precision | recall | F1 | threshold | test images |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        columns = (self.average_precision, self.precision, self.recall, self.f1, self.thresholds, self.support)
        for name, ap, precision, recall, f1, threshold, support in zip(self.class_names, *columns, strict=True):
            values = [percent(ap), percent(precision), percent(recall), percent(f1)] if support else ["absent"] * 4
            lines.append(f"| {name} | {' | '.join(values)} | {threshold:.2f} | {support} |")
        for title, worst, what in (
            ("Most often missed", self.missed, "images that have it but were not given it"),
            ("Most often invented", self.invented, "images given it that do not have it"),
        ):
            lines += ["", f"## {title}", ""]
            if worst:
                lines += [f"| class | {what} |", "| --- | ---: |", *(f"| {c} | {n} |" for c, n in worst)]
            else:
                lines.append("None.")
        return "\n".join(lines) + "\n"


class MultilabelOutputs(nn.Module):
    """Every probability (N, classes) and 0/1 target of a split, gathered from all processes under DDP,
    for metrics that need the whole split at once (average precision, thresholds picked on it)."""

    def __init__(self) -> None:
        super().__init__()
        self.probabilities, self.targets = CatMetric(nan_strategy="disable"), CatMetric(nan_strategy="disable")

    def update(self, probabilities: Tensor, targets: Tensor) -> None:
        self.probabilities.update(probabilities.float())
        self.targets.update(targets.float())

    def compute(self) -> tuple[Tensor, Tensor]:
        """(probabilities, integer targets) of the whole split."""
        return self.probabilities.compute(), self.targets.compute().long()

    def reset(self) -> None:
        self.probabilities.reset()
        self.targets.reset()


def average_precisions(probabilities: Tensor, targets: Tensor) -> Tensor:
    """Average precision per class (torchmetrics, exact); NaN for a class without positives."""
    with warnings.catch_warnings():  # a class without positives: reported as NaN here, not as torchmetrics' 0
        warnings.filterwarnings("ignore", message="No positive samples", category=UserWarning)
        values = multilabel_average_precision(probabilities, targets, targets.shape[1], average=None)
    return torch.where(targets.sum(dim=0) > 0, values.float(), math.nan)


def mean_over_present(values: Tensor) -> float:
    """The mean of the per-class ``values`` that are defined (NaN when none is)."""
    defined = values[~values.isnan()]
    return float(defined.mean()) if len(defined) else math.nan


def pick_thresholds(probabilities: Tensor, targets: Tensor) -> Tensor:
    """Each class's decision threshold from :data:`THRESHOLD_GRID` with the best F1 on these images (the
    lowest of ties); :data:`DEFAULT_THRESHOLD` for a class without positives, where every F1 is 0."""
    grid = THRESHOLD_GRID.to(probabilities.device)
    precision, recall, _ = multilabel_precision_recall_curve(probabilities, targets, targets.shape[1], thresholds=grid)
    precision, recall = precision[:, :-1].nan_to_num(0.0), recall[:, :-1]  # the last point is (1, 0), no threshold
    f1 = (2 * precision * recall / (precision + recall)).nan_to_num(0.0)
    thresholds = grid[f1.argmax(dim=1)]
    return torch.where(targets.sum(dim=0) > 0, thresholds, DEFAULT_THRESHOLD)


def multilabel_f1(probabilities: Tensor, targets: Tensor, thresholds: Tensor) -> tuple[Tensor, float]:
    """(F1 per class, micro-F1) of the labels at or above ``thresholds`` (per class)."""
    predicted, classes = (probabilities >= thresholds).long(), targets.shape[1]
    per_class = multilabel_f1_score(predicted, targets, classes, average="none", zero_division=0)
    micro = multilabel_f1_score(predicted, targets, classes, average="micro", zero_division=0)
    return torch.where(targets.sum(dim=0) > 0, per_class.float(), math.nan), float(micro)


def multilabel_report(
    probabilities: Tensor, targets: Tensor, thresholds: Tensor, class_names: list[str]
) -> MultilabelReport:
    """The :class:`MultilabelReport` of a split's probabilities and 0/1 targets at ``thresholds``."""
    predicted, classes = (probabilities >= thresholds).long(), len(class_names)
    stats = multilabel_stat_scores(predicted, targets, classes, average=None)  # tp, fp, tn, fn, support per class
    support, present = stats[:, 4], stats[:, 4] > 0
    precision = multilabel_precision(predicted, targets, classes, average="none", zero_division=0).float()
    recall = multilabel_recall(predicted, targets, classes, average="none", zero_division=0).float()
    f1, micro_f1 = multilabel_f1(probabilities, targets, thresholds)
    ap = average_precisions(probabilities, targets)

    def worst(counts: Tensor) -> list[tuple[str, int]]:
        order = torch.argsort(counts, descending=True, stable=True)[:WORST_CLASSES]
        return [(class_names[i], int(counts[i])) for i in order.tolist() if counts[i] > 0]

    return MultilabelReport(
        class_names=list(class_names),
        average_precision=ap.tolist(),
        precision=torch.where(present & (stats[:, 0] + stats[:, 1] > 0), precision, math.nan).tolist(),
        recall=torch.where(present, recall, math.nan).tolist(),
        f1=f1.tolist(),
        support=support.tolist(),
        thresholds=thresholds.tolist(),
        images=len(targets),
        mean_average_precision=mean_over_present(ap),
        macro_f1=mean_over_present(f1),
        micro_f1=micro_f1,
        missed=worst(stats[:, 3]),
        invented=worst(stats[:, 1]),
        calibration_error=multilabel_calibration_error(probabilities, targets),
    )


class MultilabelMetrics(TaskMetrics):
    """Every validation and test probability, gathered for metrics that need the whole split (AP, thresholds)."""

    def __init__(self) -> None:
        super().__init__()
        self.val_outputs, self.test_outputs = MultilabelOutputs(), MultilabelOutputs()

    def training_update(self, logits: Tensor, labels: Tensor) -> dict[str, Metric]:
        return {}  # accuracy does not apply; mAP needs the whole split

    def update(self, stage: Literal["val", "test"], logits: Tensor, labels: Tensor) -> dict[str, Metric]:
        targets = labels if labels.ndim == 2 else F.one_hot(labels, logits.shape[1])  # single-label data too
        (self.val_outputs if stage == "val" else self.test_outputs).update(logits.sigmoid(), targets)
        return {}  # AP and the thresholds need the whole split: validation_end, test_end

    def validation_end(self, task: MultilabelTask, sanity_checking: bool) -> dict[str, float]:
        """mAP, macro- and micro-F1 and per-class AP; each class's threshold picked here first (unless fixed;
        not in Lightning's sanity check)."""
        probabilities, targets = self.val_outputs.compute()  # every process gets the whole split
        self.val_outputs.reset()
        if task.pick_thresholds and not sanity_checking:
            task.thresholds.copy_(pick_thresholds(probabilities, targets))
        f1, micro_f1 = multilabel_f1(probabilities, targets, task.thresholds)
        precisions = average_precisions(probabilities, targets)
        scores = {"val/mAP": mean_over_present(precisions), "val/f1_macro": mean_over_present(f1)}
        scores["val/f1_micro"] = micro_f1
        scores["val/ece"] = multilabel_calibration_error(probabilities, targets)
        for name, ap in zip(task.class_names, precisions.tolist(), strict=True):
            if not math.isnan(ap):  # a class without validation positives has no AP
                scores[f"val/AP_{name}"] = ap
        return scores

    def test_end(self, task: MultilabelTask) -> MultilabelReport:
        probabilities, targets = self.test_outputs.compute()
        self.test_outputs.reset()
        return multilabel_report(probabilities, targets, task.thresholds, task.class_names)


class MultilabelTask(Task):
    """Any number of classes per image: a sigmoid per class, binary cross-entropy, mean average precision.

    Args:
        class_names: The classes, in label order.
        threshold: The probability at or above which an image gets a class, for every class; ``None``
            picks each class's threshold on validation (best F1), each epoch. The thresholds are a buffer,
            so checkpoints and exported models carry them.
    """

    name = "multilabel"
    score = "mAP"
    score_title = "mean average precision (mAP)"
    single_label = False
    true_column = "true_labels"

    def __init__(self, class_names: list[str], threshold: float | None = None) -> None:
        super().__init__(class_names)
        self.pick_thresholds = threshold is None
        self.register_buffer("thresholds", torch.full((len(class_names),), threshold or DEFAULT_THRESHOLD))

    def probabilities(self, logits: Tensor) -> Tensor:
        return logits.sigmoid()

    def flip_average(self, logits: Tensor, mirrored: Tensor) -> Tensor:
        """log(p) - log(1 - p) of p, the mean of the two sigmoids (in log space; the halves cancel)."""
        positive = torch.logsumexp(torch.stack([F.logsigmoid(logits), F.logsigmoid(mirrored)]), dim=0)
        negative = torch.logsumexp(torch.stack([F.logsigmoid(-logits), F.logsigmoid(-mirrored)]), dim=0)
        return positive - negative

    def training_loss(
        self, logits: Tensor, labels: Tensor, label_smoothing: float = 0.0, class_weights: Tensor | None = None
    ) -> Tensor:
        """Binary cross-entropy; label smoothing of a sigmoid makes the targets 1 - s/2 and s/2, and the class
        weights weigh each class's positives."""
        targets = self.targets(labels).float() * (1 - label_smoothing) + label_smoothing / 2
        return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=class_weights)

    def evaluation_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """The mean over classes of each image's binary cross-entropy."""
        targets = self.targets(labels).float()
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(dim=1)

    def chosen(self, probabilities: Tensor) -> Tensor:
        return (probabilities >= self.thresholds.to(probabilities.device)).long()

    def score_of(self, probabilities: Tensor, labels: Tensor) -> float:
        return mean_over_present(average_precisions(probabilities, self.targets(labels).long()))

    def explained_class(self, labels: Tensor, probabilities: Tensor) -> Tensor:
        """Each image's true class with the lowest probability (the most missed one); the most probable class
        for an image without labels."""
        targets = self.targets(labels).bool()
        missed = torch.where(targets, probabilities, torch.inf).argmin(dim=1)
        return torch.where(targets.any(dim=1), missed, probabilities.argmax(dim=1))

    def metrics(self) -> MultilabelMetrics:
        return MultilabelMetrics()

    def describe_output(self) -> dict[str, Any]:
        return {
            "activation": "sigmoid per class (multilabel): an image has every class at or above its threshold",
            "thresholds": dict(zip(self.class_names, self.thresholds.tolist(), strict=True)),
        }

    def load_output_description(self, output: dict[str, Any]) -> None:
        self.thresholds.copy_(torch.tensor([output["thresholds"][name] for name in self.class_names]))

    def prediction_header(self, top_k: int) -> list[str]:
        return ["labels", *(f"probability_{name}" for name in self.class_names)]

    def prediction_cells(self, probabilities: Tensor, top_k: int, unknown_score: float | None = None) -> list[str]:
        return [self.join(self.chosen(probabilities[None])[0]), *(f"{p:.6f}" for p in probabilities.tolist())]

    def answer(self, probabilities: Tensor, top_k: int, unknown_score: float | None = None) -> dict[str, Any]:
        labels = [c for c, chosen in zip(self.class_names, self.chosen(probabilities[None])[0], strict=True) if chosen]
        return super().answer(probabilities, top_k) | {"labels": labels}

    def dashboard(self) -> dict[str, Any]:
        return self._dashboard([r"val/mAP", r"val/f1_macro", r"val/f1_micro"], "mAP and F1 (val)")
