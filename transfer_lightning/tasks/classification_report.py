"""The test report of one class per image: per-class precision, recall and F1, macro-F1, top-5, the most confused
pairs, calibration and the share kept by "none of these"; and the torchmetrics that compute it.

All numbers come from torchmetrics (synchronised across processes under DDP). A class without
test images is reported as absent, not as 0%: its recall is undefined, and so are its F1 and its
share in macro-F1, which averages over the classes that have test images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from transfer_lightning.tasks.base import TestReport, percent
from transfer_lightning.tasks.calibration import ECE_BINS, reliability_diagram

#: Top-k accuracy is reported for k = 5 when there are more than this many classes.
TOP_K = 5
#: Most confused (true, predicted) class pairs in the report.
CONFUSED_PAIRS = 5


@dataclass(frozen=True)
class ClassificationReport(TestReport):
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
    #: Test images per (true class, predicted class).
    confusion: Tensor
    #: Expected calibration error of the test's probabilities before and after the temperature (None: not measured).
    calibration_error_before: float | None = None
    calibration_error: float | None = None
    temperature: float = 1.0
    #: The reliability diagram's points before and after the temperature (see :func:`.calibration.reliability`).
    reliability: dict[str, list[tuple[float, float, int]]] | None = None
    #: The share of test images kept as known by the threshold of "none of these", chosen on validation to keep
    #: ``known_rate`` of its images (None: no threshold).
    known_kept: float | None = None
    known_rate: float | None = None

    @property
    def present(self) -> list[bool]:
        return [count > 0 for count in self.support]

    def scalars(self) -> dict[str, float]:
        values = {"test/acc": self.accuracy, "test/f1_macro": self.macro_f1}
        if self.calibration_error is not None:
            values |= {"test/ece_uncalibrated": self.calibration_error_before, "test/ece": self.calibration_error}
        if self.known_kept is not None:
            values["test/known_kept"] = self.known_kept
        if self.top_k_accuracy is not None:
            values[f"test/acc_top{TOP_K}"] = self.top_k_accuracy
        for name, recall, present in zip(self.class_names, self.recall, self.present, strict=True):
            if present:  # a class without test images has no accuracy, rather than 0%
                values[f"test/acc_{name}"] = recall
        return values

    def figures(self) -> dict[str, Any]:
        figure, _ = MulticlassConfusionMatrix(len(self.class_names)).plot(self.confusion, labels=self.class_names)
        figure.set_size_inches(8, 8)
        figures = {"test/confusion_matrix": figure}
        if self.reliability is not None:
            figures["test/reliability_diagram"] = reliability_diagram(self.reliability)
        return figures

    def to_markdown(self) -> str:
        lines = [
            "# Classification report",
            "",
            f"{sum(self.support)} test images; accuracy {percent(self.accuracy)}"
            + (f", top-{TOP_K} accuracy {percent(self.top_k_accuracy)}" if self.top_k_accuracy is not None else "")
            + f", macro-F1 {percent(self.macro_f1)} (mean over the {sum(self.present)} classes with test images).",
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
                lines.append(f"| {name} | {percent(precision)} | {percent(recall)} | {percent(f1)} | {support} |")
        lines.append("")
        if self.calibration_error is not None:
            lines += [
                f"Calibration: expected calibration error {percent(self.calibration_error)} with temperature "
                f"{self.temperature:.3f} ({percent(self.calibration_error_before)} without; {ECE_BINS} bins).",
                "",
            ]
        if self.known_kept is not None:
            lines += [
                f"None of these: the threshold on the unknown score, chosen on validation to keep "
                f"{percent(self.known_rate)} of its images, keeps {percent(self.known_kept)} of the test images "
                "(the others would be answered unknown).",
                "",
            ]
        if self.confused:
            lines += [
                "## Most confused classes",
                "",
                "| true class | predicted as | images | share of the true class |",
                "| --- | --- | ---: | ---: |",
            ]
            support = dict(zip(self.class_names, self.support, strict=True))
            lines += [f"| {t} | {p} | {n} | {percent(n / support[t])} |" for t, p, n in self.confused]
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

    def compute(self, class_names: list[str]) -> ClassificationReport:
        """The report, with the confusion matrix (rows: true class, columns: predicted)."""
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
        return ClassificationReport(
            class_names=list(class_names),
            precision=per_class("precision", present & (confusion.sum(dim=0) > 0)),  # n/a: never predicted
            recall=per_class("recall"),
            f1=per_class("f1"),
            support=support.tolist(),
            accuracy=float(values["accuracy"]),
            top_k_accuracy=float(values["top_k_accuracy"]) if "top_k_accuracy" in values else None,
            macro_f1=float(f1[present].mean()) if present.any() else math.nan,
            confused=confused,
            confusion=confusion,
        )
