"""What ``audit`` found, over every image of every split: the tables it writes, most suspicious first, and the
summary it prints."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

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


class Duplicate(NamedTuple):
    """Two images (``a`` < ``b`` in the audit's order), their features' and thumbnails' cosine similarities, and
    ``exact`` (identical pixels) or ``near``."""

    a: int
    b: int
    similarity: float
    pixel_similarity: float
    kind: str


@dataclass(frozen=True)
class Findings:
    """Wrong labels, duplicate pairs and outlier scores of :class:`AuditedImages`."""

    images: AuditedImages
    labels: LabelFindings
    duplicates: list[Duplicate]
    outlier_scores: Tensor
    outliers: Tensor

    def is_leak(self, pair: Duplicate) -> bool:
        return frozenset({self.images.splits[pair.a], self.images.splits[pair.b]}) in LEAKS

    def ranked_duplicates(self) -> list[Duplicate]:
        """Leaks across splits first, then exact copies, then by the larger of the two similarities."""
        return sorted(
            self.duplicates,
            key=lambda d: (not self.is_leak(d), d.kind != "exact", -max(d.similarity, d.pixel_similarity)),
        )

    def write(self, folder: Path) -> list[Path]:
        """``label_issues.csv`` (every image, lowest label quality first), ``duplicates.csv`` (leaks across splits
        first, then exact copies, then by similarity) and ``outliers.csv`` (every image, farthest first)."""
        images, names, splits = self.images, self.images.names, self.images.splits
        label_rows = [
            [names[i], splits[i], images.given(i), images.label_text(self.labels.suggested[i]),
             f"{self.labels.quality[i]:.6f}", str(bool(self.labels.is_issue[i])).lower()]
            for i in np.argsort(self.labels.quality, kind="stable")
        ]  # fmt: skip
        duplicate_rows = [
            [
                names[d.a],
                splits[d.a],
                names[d.b],
                splits[d.b],
                f"{d.similarity:.6f}",
                f"{d.pixel_similarity:.6f}",
                d.kind,
            ]
            for d in self.ranked_duplicates()
        ]
        outlier_rows = [
            [names[i], splits[i], f"{float(self.outlier_scores[i]):.6f}", str(bool(self.outliers[i])).lower()]
            for i in torch.argsort(self.outlier_scores, descending=True, stable=True).tolist()
        ]
        tables = {
            "label_issues.csv": (
                ["path", "split", "given_label", "suggested_label", "label_quality", "is_issue"],
                label_rows,
            ),
            "duplicates.csv": (
                ["path_a", "split_a", "path_b", "split_b", "similarity", "pixel_similarity", "kind"],
                duplicate_rows,
            ),
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
        leaks = sum(self.is_leak(pair) for pair in self.duplicates)
        exact = sum(pair.kind == "exact" for pair in self.duplicates)
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
