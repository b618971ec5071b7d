"""The classification report of ``test``: per-class precision, recall and F1, macro-F1, top-5, confusions.

All numbers come from torchmetrics (synchronised across processes under DDP). A class without
test images is reported as absent, not as 0%: its recall is undefined, and so are its F1 and its
share in macro-F1, which averages over the classes that have test images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


def _percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.1f}%"
