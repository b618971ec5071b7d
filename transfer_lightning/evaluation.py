"""The classification report of ``test``: per-class precision, recall and F1, macro-F1, top-5, confusions;
for multi-label data per-class average precision, F1 at the decision thresholds, missed and invented labels.

All numbers come from torchmetrics (synchronised across processes under DDP). A class without
test images is reported as absent, not as 0%: its recall is undefined, and so are its F1 and its
share in macro-F1, which averages over the classes that have test images.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.aggregation import CatMetric
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)
from torchmetrics.functional.classification import (
    multilabel_average_precision,
    multilabel_f1_score,
    multilabel_precision,
    multilabel_precision_recall_curve,
    multilabel_recall,
    multilabel_stat_scores,
)

#: Top-k accuracy is reported for k = 5 when there are more than this many classes.
TOP_K = 5
#: Most confused (true, predicted) class pairs in the report.
CONFUSED_PAIRS = 5


@dataclass(frozen=True)
class ClassificationReport:
    """Test metrics of one run; per-class values are NaN for classes without test images (and
    precision for classes that were never predicted)."""

    class_names: list[str]
    precision: list[float]
    recall: list[float]
    f1: list[float]
    support: list[int]
    accuracy: float
    top_k_accuracy: float | None
    macro_f1: float
    #: (true class, predicted class, images) of the most frequent confusions, most frequent first.
    confused: list[tuple[str, str, int]]

    @property
    def present(self) -> list[bool]:
        return [count > 0 for count in self.support]

    def to_markdown(self) -> str:
        lines = [
            "# Classification report",
            "",
            f"{sum(self.support)} test images; accuracy {_percent(self.accuracy)}"
            + (f", top-{TOP_K} accuracy {_percent(self.top_k_accuracy)}" if self.top_k_accuracy is not None else "")
            + f", macro-F1 {_percent(self.macro_f1)} (mean over the {sum(self.present)} classes with test images).",
            "",
            "| class | precision | recall | F1 | test images |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for name, precision, recall, f1, support in zip(
            self.class_names, self.precision, self.recall, self.f1, self.support, strict=True
        ):
            if support == 0:
                lines.append(f"| {name} | absent | absent | absent | 0 |")
            else:
                lines.append(f"| {name} | {_percent(precision)} | {_percent(recall)} | {_percent(f1)} | {support} |")
        lines.append("")
        if self.confused:
            lines += [
                "## Most confused classes",
                "",
                "| true class | predicted as | images | share of the true class |",
                "| --- | --- | ---: | ---: |",
            ]
            support = dict(zip(self.class_names, self.support, strict=True))
            lines += [f"| {t} | {p} | {n} | {_percent(n / support[t])} |" for t, p, n in self.confused]
        else:
            lines.append("No image was confused with another class.")
        return "\n".join(lines) + "\n"


class ClassificationMetrics(nn.Module):
    """Accumulates test predictions and turns them into a :class:`ClassificationReport`."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        per_class = {"average": "none", "zero_division": 0}
        metrics = {
            "accuracy": MulticlassAccuracy(num_classes, average="micro"),
            "precision": MulticlassPrecision(num_classes, **per_class),
            "recall": MulticlassRecall(num_classes, **per_class),
            "f1": MulticlassF1Score(num_classes, **per_class),
        }
        if num_classes > TOP_K:
            metrics["top_k_accuracy"] = MulticlassAccuracy(num_classes, top_k=TOP_K, average="micro")
        self.metrics = MetricCollection(metrics)
        self.confusion = MulticlassConfusionMatrix(num_classes)

    def update(self, logits: Tensor, labels: Tensor) -> None:
        self.metrics.update(logits, labels)
        self.confusion.update(logits, labels)

    def reset(self) -> None:
        self.metrics.reset()
        self.confusion.reset()

    def compute(self, class_names: list[str]) -> tuple[ClassificationReport, Tensor]:
        """The report, and the confusion matrix (rows: true class, columns: predicted)."""
        values = self.metrics.compute()
        confusion = self.confusion.compute()
        support = confusion.sum(dim=1)
        present = support > 0

        def per_class(name: str, defined: Tensor = present) -> list[float]:
            return torch.where(defined, values[name].float(), math.nan).tolist()

        f1 = values["f1"].float()
        off_diagonal = confusion.clone().fill_diagonal_(0)
        counts, flat = off_diagonal.flatten().topk(min(CONFUSED_PAIRS, off_diagonal.numel()))
        num_classes = len(class_names)
        confused = [
            (class_names[i // num_classes], class_names[i % num_classes], int(n))
            for n, i in zip(counts.tolist(), flat.tolist(), strict=True)
            if n > 0
        ]
        report = ClassificationReport(
            class_names=list(class_names),
            precision=per_class("precision", present & (confusion.sum(dim=0) > 0)),  # n/a: never predicted
            recall=per_class("recall"),
            f1=per_class("f1"),
            support=support.tolist(),
            accuracy=float(values["accuracy"]),
            top_k_accuracy=float(values["top_k_accuracy"]) if "top_k_accuracy" in values else None,
            macro_f1=float(f1[present].mean()) if present.any() else math.nan,
            confused=confused,
        )
        return report, confusion


#: The decision thresholds a multi-label class's threshold is picked from on the validation set.
THRESHOLD_GRID = torch.linspace(0.01, 0.99, 99)
#: The threshold of a class that validation cannot pick one for (no positive validation image).
DEFAULT_THRESHOLD = 0.5
#: Classes listed as most often missed and most often invented in the multi-label report.
WORST_CLASSES = 5


@dataclass(frozen=True)
class MultilabelReport:
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

    @property
    def present(self) -> list[bool]:
        return [count > 0 for count in self.support]

    def to_markdown(self) -> str:
        lines = [
            "# Multi-label classification report",
            "",
            f"{self.images} test images, {sum(self.support)} labels; mAP {_percent(self.mean_average_precision)} "
            f"(mean over the {sum(self.present)} classes with test images), at the decision thresholds "
            f"macro-F1 {_percent(self.macro_f1)} and micro-F1 {_percent(self.micro_f1)}.",
            "",
            "| class | AP | precision | recall | F1 | threshold | test images |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        columns = (self.average_precision, self.precision, self.recall, self.f1, self.thresholds, self.support)
        for name, ap, precision, recall, f1, threshold, support in zip(self.class_names, *columns, strict=True):
            values = [_percent(ap), _percent(precision), _percent(recall), _percent(f1)] if support else ["absent"] * 4
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
    )


def _percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.1f}%"
