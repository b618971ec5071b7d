"""What ``audit`` found, over every image of every split: the tables it writes, most suspicious first, and the
summary it prints."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from transfer_lightning.audit.labels import LabelFindings
from transfer_lightning.files import atomic_path

#: A pair of images in these two splits lets the test (or validation) score see a training image.
LEAKS = {frozenset({"train", "test"}), frozenset({"train", "val"}), frozenset({"val", "test"})}


@dataclass(frozen=True)
class AuditedImages:
    """Every image audited: its name (as its source names it), its split and its given label(s), in one order."""

    names: list[str]
    splits: list[str]
    labels: Tensor
    class_names: list[str]

    def label_text(self, row: Tensor) -> str:
        """0/1 per class as the class names joined by ``;``."""
        return ";".join(self.class_names[k] for k in np.flatnonzero(row.numpy()))

    def given(self, index: int) -> str:
        label = self.labels[index]
        return self.label_text(label) if label.ndim == 1 else self.class_names[int(label)]


@dataclass(frozen=True)
class Findings:
    """Wrong labels, duplicate pairs (``(i, j, similarity, kind)``) and outlier scores of :class:`AuditedImages`."""

    images: AuditedImages
    labels: LabelFindings
    duplicates: list[tuple[int, int, float, str]]
    outlier_scores: Tensor
    outliers: Tensor

    def is_leak(self, i: int, j: int) -> bool:
        return frozenset({self.images.splits[i], self.images.splits[j]}) in LEAKS

    def write(self, folder: Path) -> list[Path]:
        """``label_issues.csv`` (every image, lowest label quality first), ``duplicates.csv`` (leaks across splits
        first, then exact copies, then by similarity) and ``outliers.csv`` (every image, farthest first)."""
        images, names, splits = self.images, self.images.names, self.images.splits
        label_rows = [
            [names[i], splits[i], images.given(i), images.label_text(self.labels.suggested[i]),
             f"{self.labels.quality[i]:.6f}", str(bool(self.labels.is_issue[i])).lower()]
            for i in np.argsort(self.labels.quality, kind="stable")
        ]  # fmt: skip
        pairs = sorted(self.duplicates, key=lambda d: (not self.is_leak(d[0], d[1]), d[3] != "exact", -d[2]))
        duplicate_rows = [[names[i], splits[i], names[j], splits[j], f"{s:.6f}", kind] for i, j, s, kind in pairs]
        outlier_rows = [
            [names[i], splits[i], f"{float(self.outlier_scores[i]):.6f}", str(bool(self.outliers[i])).lower()]
            for i in torch.argsort(self.outlier_scores, descending=True, stable=True).tolist()
        ]
        tables = {
            "label_issues.csv": (
                ["path", "split", "given_label", "suggested_label", "label_quality", "is_issue"],
                label_rows,
            ),
            "duplicates.csv": (["path_a", "split_a", "path_b", "split_b", "similarity", "kind"], duplicate_rows),
            "outliers.csv": (["path", "split", "score", "is_outlier"], outlier_rows),
        }
        written = []
        for name, (header, rows) in tables.items():
            with atomic_path(folder / name) as partial, open(partial, "w", newline="") as file:
                writer = csv.writer(file)
                writer.writerow(header)
                writer.writerows(rows)
            written.append(folder / name)
        return written

    def summary(self) -> str:
        """How many of each, their share of the images, the leaks across splits first."""
        total = len(self.images.names)
        leaks = sum(self.is_leak(i, j) for i, j, _, _ in self.duplicates)
        exact = sum(kind == "exact" for *_, kind in self.duplicates)
        issues, outliers = int(self.labels.is_issue.sum()), int(self.outliers.sum())

        def share(count: int) -> str:
            return f"{count} ({100 * count / total:.2f}% of the {total} images)"

        return "\n".join(
            [
                f"Leaks across splits (train/val/test pairs of duplicates): {leaks}",
                f"Duplicate pairs: {len(self.duplicates)} ({exact} exact, {len(self.duplicates) - exact} near)",
                f"Likely wrong labels: {share(issues)}",
                f"Outliers: {share(outliers)}",
            ]
        )
