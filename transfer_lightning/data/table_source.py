"""A label table joined with its image files: each row's file found under the images folder (by path, or by
stem), the rows by split, and what the log says of them (:class:`TableSource`)."""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from transfer_lightning.data.listing import IMAGE_EXTENSIONS, is_hidden_or_system
from transfer_lightning.data.tables import SKIPPED_ROWS_SHOWN, Label, LabelTable, read_label_table, refuse_rows
from transfer_lightning.errors import UserInputError


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


@dataclass(frozen=True)
class TableSource:
    """A label table with its rows' image files found: what the data module reads instead of class folders."""

    table: LabelTable
    images_dir: Path
    resolved: ResolvedRows

    @classmethod
    def open(
        cls,
        labels_file: str,
        data_dir: Path | None,
        images_dir: str | None,
        columns: tuple[str | None, str | list[str] | None, str | None],
        label_delimiter: str,
        skip_missing: bool,
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
        resolved = resolve_files(table, root, skip_missing)
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
        return cls(table, root, resolved)

    def split_samples(self) -> list[tuple[str, list[tuple[str, Label]]] | None]:
        """(name, samples) of the train, val and test rows; None for a split without rows. Without a
        split column every row is a training row."""
        samples = self.resolved.samples
        train = samples.get(None, samples.get("train"))
        return [("train", train)] + [(split, samples[split]) if split in samples else None for split in ("val", "test")]

    def pool_names(self) -> list[str | None]:
        """How the log names the train, val and test rows."""
        name, samples = self.table.path.name, self.resolved.samples
        train = f"{name} ({'all' if None in samples else 'train'} rows)"
        return [train] + [f"{name} ({split} rows)" if split in samples else None for split in ("val", "test")]

    def summary(self, splits: dict[str, Tensor]) -> str:
        """One log line: the table's rows, and the images and classes of each split, from its labels."""
        parts = []
        for split, labels in splits.items():
            classes = int((labels.sum(dim=0) > 0).sum()) if labels.ndim == 2 else len(torch.unique(labels))
            parts.append(f"{split} {len(labels)} images, {classes} classes")
        return f"{self.table.path.name}: {len(self.table.rows)} rows; " + "; ".join(parts) + "."
