"""``--data.exclude FILE`` and ``--data.relabel FILE``: acting on what ``audit`` found, before the data is split.

Both read a CSV with a ``path`` column naming images as ``audit`` does (a file relative to the data's folder, or to
a label table's images; ``train 00042`` for CIFAR-10's own batches). ``exclude`` leaves out: the rows marked true in
an ``is_issue`` or ``is_outlier`` column when there is one (``label_issues.csv``, ``outliers.csv``), the second
image of each pair of ``duplicates.csv`` (``path_b``: one copy stays), else every row. ``relabel`` gives each row's
image the class in its ``label`` column (several, for multi-label data, joined by ``;``), or in
``suggested_label`` for the rows marked ``is_issue`` of ``label_issues.csv``.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info

from transfer_lightning.data.datasets import ImageArrays, ImageTensorDataset
from transfer_lightning.data.splits import Pools
from transfer_lightning.errors import UserInputError


def image_name(name: str, root: Path) -> str:
    """A file's path relative to the data's folder (as ``audit`` names it); other names as they are."""
    return Path(os.path.relpath(name, root)).as_posix() if os.path.isabs(name) else name


@dataclass(frozen=True)
class DataEdits:
    """The images to leave out, and the new label of images to relabel, by name."""

    excluded: frozenset[str] = frozenset()
    relabelled: dict[str, str] = field(default_factory=dict)

    @classmethod
    def read(cls, exclude: str | None, relabel: str | None) -> DataEdits:
        excluded = frozenset(_excluded(_rows(exclude, "exclude"))) if exclude else frozenset()
        return cls(excluded, dict(_relabelled(_rows(relabel, "relabel"))) if relabel else {})

    def apply(self, pools: Pools[ImageTensorDataset], root: Path, class_names: list[str]) -> Pools:
        """The pools without the excluded images and with the new labels; one log line says how many of each."""
        if not self.excluded and not self.relabelled:
            return pools
        found: set[str] = set()
        edited = []
        for pool in pools[:3]:
            if pool is None:
                edited.append(None)
                continue
            names = [image_name(name, root) for name in pool.image_names()]
            found.update(name for name in names if name in self.excluded or name in self.relabelled)
            if self.relabelled:
                pool = self._relabel(pool, names, class_names)
            keep = torch.tensor([name not in self.excluded for name in names])
            edited.append(pool.subset(torch.nonzero(keep).flatten()))
        unknown = (self.excluded | set(self.relabelled)) - found
        if unknown and len(unknown) == len(self.excluded | set(self.relabelled)):
            raise UserInputError(
                f"No image of the data is named in --data.exclude / --data.relabel (e.g. {sorted(unknown)[0]!r}): "
                f"name images by their path relative to {root}, as audit's CSV files do."
            )
        excluded, relabelled = len(self.excluded & found), len(set(self.relabelled) & found)
        rank_zero_info(
            f"Data edits: {excluded} images left out (--data.exclude), {relabelled} relabelled (--data.relabel)"
            + (f"; {len(unknown)} named images are not in the data, e.g. {sorted(unknown)[0]}" if unknown else "")
            + "."
        )
        return Pools(*edited, names=pools.names, no_test=pools.no_test)

    def _relabel(self, pool: ImageTensorDataset, names: list[str], class_names: list[str]) -> ImageTensorDataset:
        """The pool with its relabelled images' labels changed, in a copy of the labels (the store is shared)."""
        labels = pool.arrays.labels.clone()
        for position, name in enumerate(names):
            if name in self.relabelled:
                row = int(pool.rows(torch.tensor(position)))
                labels[row] = label_of(self.relabelled[name], class_names, multilabel=labels.ndim == 2)
        return ImageTensorDataset(ImageArrays(pool.arrays.images, labels), pool.indices, pool.source, pool.names)


def label_of(text: str, class_names: list[str], multilabel: bool) -> torch.Tensor:
    """A class index, or a 0/1 row for several classes joined by ``;``; an unknown class is one line."""
    names = [name.strip() for name in text.split(";")] if multilabel else [text.strip()]
    unknown = [name for name in names if name not in class_names]
    if unknown or (not multilabel and len(names) != 1):
        raise UserInputError(f"--data.relabel names class {unknown[0]!r}, which the data does not have: {class_names}.")
    if not multilabel:
        return torch.tensor(class_names.index(names[0]))
    return torch.tensor([int(name in names) for name in class_names])


def _rows(path: str, option: str) -> list[dict[str, str]]:
    try:
        with open(Path(path).expanduser(), newline="") as file:
            rows = list(csv.DictReader(file))
    except OSError as error:
        raise UserInputError(f"--data.{option} {path} cannot be read ({error.strerror}).") from None
    columns = set(rows[0]) if rows else set()
    if not columns & {"path", "path_b"}:
        raise UserInputError(f"--data.{option} {path} needs a path column (as audit's CSV files have).")
    return rows


def _marked(row: dict[str, str], column: str) -> bool:
    return column not in row or row[column].strip().lower() == "true"


def _excluded(rows: list[dict[str, str]]) -> list[str]:
    if rows and "path_b" in rows[0]:  # duplicates.csv: the second of each pair
        return [row["path_b"] for row in rows]
    return [row["path"] for row in rows if _marked(row, "is_issue") and _marked(row, "is_outlier")]


def _relabelled(rows: list[dict[str, str]]) -> list[tuple[str, str]]:
    if rows and "label" not in rows[0] and "suggested_label" not in rows[0]:
        raise UserInputError("--data.relabel needs a label column (path,label), or audit's label_issues.csv.")
    column = "label" if "label" in rows[0] else "suggested_label"
    return [(row["path"], row[column]) for row in rows if _marked(row, "is_issue")]
