"""A label table as a source: each row's file found under the images folder (by path, or by stem), the rows by
split, and what the log says of them (:class:`TableSource`)."""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info

from transfer_lightning.data.listing import IMAGE_EXTENSIONS, is_hidden_or_system
from transfer_lightning.data.source import FileSource, Samples
from transfer_lightning.data.splits import Pools, Splits
from transfer_lightning.data.tables import SKIPPED_ROWS_SHOWN, Label, LabelTable, read_label_table, refuse_rows
from transfer_lightning.errors import UserInputError
from transfer_lightning.tasks import TaskName


@dataclass(frozen=True)
class ResolvedRows:
    """The image file of every row that has one, by split; ``skipped`` lists rows whose file was not found."""

    samples: dict[str | None, list[tuple[str, Label]]]
    by_stem: int
    skipped: list[str]


def resolve_files(table: LabelTable, images_dir: Path, skip_missing: bool) -> ResolvedRows:
    """Find each row's image under ``images_dir``: by its path, else by its stem when exactly one
    image file has it (an id without extension, or another extension than the one on disk)."""
    exact, stems, names = _index_images(images_dir)
    samples: dict[str | None, list[tuple[str, Label]]] = defaultdict(list)
    missing, ambiguous, first_row, duplicates, by_stem = [], [], {}, [], 0
    for row in table.rows:
        written = row.file.replace("\\", "/").removeprefix("./")
        found = exact.get(written)
        if found is None and Path(written).is_absolute() and Path(written).is_file():
            found = written
        if found is None:
            stem = written[: -len(Path(written).suffix)] if Path(written).suffix else written
            candidates = stems.get(stem, []) or stems.get(written, [])
            if not candidates and "/" not in written:
                candidates = names.get(stem, []) or names.get(written, [])
            if len(candidates) > 1:
                ambiguous.append((row.line, f"{row.file!r}: {', '.join(sorted(candidates)[:3])}"))
                continue
            if candidates:
                found, by_stem = candidates[0], by_stem + 1
        if found is None:
            missing.append(row)
            continue
        if found in first_row:
            duplicates.append((row.line, f"{row.file!r}, also on line {first_row[found]}"))
            continue
        first_row[found] = row.line
        samples[row.split].append((found, row.label))
    refuse_rows(table.path, duplicates, "name an image that an earlier row names too", "List each image once.")
    refuse_rows(
        table.path, ambiguous, f"match several image files under {images_dir}", "Write the file's extension too."
    )
    if missing and not skip_missing:
        refuse_rows(
            table.path,
            [(row.line, repr(row.file)) for row in missing],
            f"name a file that is not an image file under {images_dir}",
            "Fix the paths (relative to --data.images_dir, or data_dir), "
            "or set --data.skip_bad_images true to skip those rows.",
        )
    if not samples:
        raise UserInputError(f"No row of {table.path} names an image file under {images_dir}.")
    skipped = [f"{table.path}, line {row.line}: {row.file}: no such image file" for row in missing]
    return ResolvedRows(dict(samples), by_stem, skipped)


def _index_images(root: Path) -> tuple[dict[str, str], dict[str, list[str]], dict[str, list[str]]]:
    """Every image file under ``root`` (hidden and system files skipped): by relative path, by relative
    path without extension, and by file name without extension."""
    exact, stems, names = {}, defaultdict(list), defaultdict(list)
    for parent, folders, files in os.walk(root, followlinks=True):
        folders[:] = [folder for folder in folders if not is_hidden_or_system(folder)]
        for name in files:
            base, extension = os.path.splitext(name)
            if is_hidden_or_system(name) or extension.lower() not in IMAGE_EXTENSIONS:
                continue
            path = os.path.join(parent, name)
            relative = Path(os.path.relpath(path, root)).as_posix()
            exact[relative] = path
            stems[relative[: -len(extension)]].append(path)
            names[base].append(path)
    return exact, stems, names


class TableSource(FileSource):
    """A label table with its rows' image files found: one pool per split of its rows (all rows train without a split
    column)."""

    def __init__(
        self,
        table: LabelTable,
        images_dir: Path,
        resolved: ResolvedRows,
        given: list[str] | None,
        cache_dir: Path,
        skip_bad_images: bool,
    ) -> None:
        super().__init__(cache_dir, skip_bad_images)
        self.table, self.images_dir, self.resolved, self.root = table, images_dir, resolved, table.path
        self.class_names = table.class_names
        if given is not None and list(given) != self.class_names:
            raise UserInputError(
                f"data.class_names {list(given)} differ from the classes of {table.path}: {self.class_names}. "
                "Leave data.class_names unset to use the table's."
            )

    @classmethod
    def open(
        cls,
        labels_file: str,
        data_dir: Path | None,
        images_dir: str | None,
        columns: tuple[str | None, str | list[str] | None, str | None],
        label_delimiter: str,
        given: list[str] | None,
        cache_dir: Path,
        skip_bad_images: bool,
    ) -> TableSource:
        """Read and check the table, find its files, and log how. ``columns``: the file, label and split
        columns, None to find them by name. A relative ``labels_file`` not found here is looked for in
        ``data_dir``; the images are under ``images_dir``, else ``data_dir``, else the table's folder."""
        path = Path(labels_file).expanduser()
        if not path.is_file() and data_dir is not None and (data_dir / path).is_file():
            path = data_dir / path
        if not path.is_file():
            raise UserInputError(f"data.labels_file {labels_file} does not exist: pass the path of a CSV or TSV file.")
        root = Path(images_dir).expanduser() if images_dir else data_dir or path.parent
        if not root.is_dir():
            raise UserInputError(f"data.images_dir {root} does not exist: pass the folder of the table's images.")
        table = read_label_table(path, *columns, label_delimiter=label_delimiter)
        resolved = resolve_files(table, root, skip_bad_images)
        rank_zero_info(f"Labels from {path} ({len(table.rows)} rows, {len(table.class_names)} classes): {table.how}.")
        if resolved.by_stem:
            rank_zero_info(
                f"{resolved.by_stem} rows named their file without its extension (or with another): found by stem."
            )
        if resolved.skipped:
            shown = "\n  ".join(resolved.skipped[:SKIPPED_ROWS_SHOWN])
            more = len(resolved.skipped) - SKIPPED_ROWS_SHOWN
            rank_zero_info(
                f"Skipped {len(resolved.skipped)} rows whose file is not an image under {root}:\n  {shown}"
                + (f"\n  ... {more} more" if more > 0 else "")
            )
        return cls(table, root, resolved, given, cache_dir, skip_bad_images)

    @property
    def task(self) -> TaskName:
        return "multilabel" if self.table.multilabel else "multiclass"

    @property
    def names_root(self) -> Path:
        """The folder the table's paths are relative to."""
        return self.images_dir

    def describe(self) -> str:
        return f"label table {self.table.path} ({len(self.table.rows)} rows; images under {self.images_dir})"

    def sample_pools(self) -> Pools[Samples]:
        """The train, val and test rows; without a split column every row is a training row."""
        samples, name, stem = self.resolved.samples, self.table.path.name, self.table.path.stem
        pools, names = [], []
        for split in ("train", "val", "test"):
            rows = samples.get(None, samples.get("train")) if split == "train" else samples.get(split)
            pools.append(Samples(rows, self.images_dir, f"{stem}-{split}") if rows is not None else None)
            which = "all" if split == "train" and None in samples else split
            names.append(f"{name} ({which} rows)" if rows is not None else None)
        return Pools(*pools, names=tuple(names), no_test="no test rows")

    def summary(self, splits: Splits) -> str:
        """The table's rows, and the images and classes of each split, from its labels."""
        parts = []
        for split, subset in zip(("train", "val", "test"), splits[:3], strict=True):
            labels = subset.labels
            classes = int((labels.sum(dim=0) > 0).sum()) if labels.ndim == 2 else len(torch.unique(labels))
            parts.append(f"{split} {len(labels)} images, {classes} classes")
        return f"{self.table.path.name}: {len(self.table.rows)} rows; " + "; ".join(parts) + "."
