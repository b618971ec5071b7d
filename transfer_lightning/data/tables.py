"""Labels from a table: a CSV or TSV file that names each image and its label (or labels).

The formats of Kaggle competitions, lab exports, Lightning Flash's ``from_csv``, fastai's
``from_csv`` and Hugging Face's ``metadata.csv`` / ``metadata.jsonl``:

- a header row; fields separated by tabs (``.tsv`` or a tab in the header), commas or semicolons;
  UTF-8 with or without a byte-order mark, any line ends, quoted fields; or JSON Lines (``.jsonl``:
  one object per image, a list for several labels);
- a file column (``file``, ``filename``, ``image``, ``image_name``, ``id``, ``path``, ...) holding paths
  relative to the images folder, or names without (or with another) extension, found by their stem;
- either a label column (``label``, ``labels``, ``class``, ``tags``, ``target``, ...), holding one class
  name, or several separated by one delimiter (multi-label), or one 0/1 column per class;
- optionally a split column (``split``: ``train`` / ``val`` / ``test``, in any case).

Every bad row is reported with its line number; a table with bad rows stops with one message that
names the first of them and their count (rows naming missing files are skipped and listed instead
with ``skip_bad_images``).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info

from transfer_lightning.data.folders import TEST_FOLDER_NAMES, TRAIN_FOLDER_NAMES, VAL_FOLDER_NAMES
from transfer_lightning.errors import UserInputError

#: Column names looked for, in this order, compared in lower case.
FILE_COLUMNS = ("file", "filename", "file_name", "filepath", "file_path", "image", "image_name", "image_id", "img")
FILE_COLUMNS += ("image_path", "path", "id", "name")
LABEL_COLUMNS = ("label", "labels", "class", "classes", "class_name", "tags", "tag", "target", "category")
SPLIT_COLUMNS = ("split", "subset", "set", "partition")
#: Delimiters looked for between several labels in one field (the field separator aside), in this order.
LABEL_DELIMITERS = (";", ",", "|", " ")
#: Rows named in an error message (the message also gives the count).
ROWS_SHOWN = 5
#: Skipped rows named in the log (the log also gives the count).
SKIPPED_ROWS_SHOWN = 10
#: The values of a 0/1 column.
FALSE_VALUES, TRUE_VALUES = ("0", "0.0", "false"), ("1", "1.0", "true")

Label = int | tuple[int, ...]


@dataclass(frozen=True)
class TableRow:
    """One row: its line in the file, the file as written, its split (None without a split column), its label:
    a class index, or for multi-label a 0/1 tuple with one entry per class."""

    line: int
    file: str
    split: str | None
    label: Label


@dataclass(frozen=True)
class LabelTable:
    """A table read and checked; ``how`` says in words which columns and delimiter were used."""

    path: Path
    class_names: list[str]
    multilabel: bool
    rows: list[TableRow]
    how: str


def read_label_table(
    path: Path,
    file_column: str | None = None,
    label_column: str | list[str] | None = None,
    split_column: str | None = None,
    label_delimiter: str = "auto",
) -> LabelTable:
    """Read and check the table at ``path``; see the module docstring for the formats.

    ``label_column`` may list the 0/1 columns of a one-hot table. ``label_delimiter``: ``auto``
    (see :func:`find_label_delimiter`), ``none`` (one class name per row, spaces and all), ``space``,
    or the delimiter itself.
    """
    header, records = _read_records(path)
    lower = {name.lower(): index for index, name in enumerate(header)}

    def column(given: str | None, candidates: tuple[str, ...], what: str) -> int | None:
        if given is not None:
            if given.lower() not in lower:
                raise UserInputError(f"{path} has no column {given!r} (data.{what}_column); its columns are {header}.")
            return lower[given.lower()]
        return next((lower[name] for name in candidates if name in lower), None)

    file_index = column(file_column, FILE_COLUMNS, "file")
    if file_index is None:
        raise UserInputError(
            f"{path} has no file column: its columns are {header}. Name the column of image files "
            f"{' / '.join(FILE_COLUMNS[:5])}, or set --data.file_column."
        )
    split_index = column(split_column, SPLIT_COLUMNS, "split")
    taken = {file_index, split_index}
    if isinstance(label_column, list):
        label_indices = [column(name, (), "label") for name in label_column]
    else:
        single = column(label_column, LABEL_COLUMNS, "label")
        label_indices = [single] if single is not None else _one_hot_columns(header, records, taken)
    if not label_indices:
        raise UserInputError(
            f"{path} has no label column: its columns are {header}. Name it label / labels / class / tags, "
            "give it with --data.label_column, or give one 0/1 column per class."
        )
    files = [(line, record[file_index].strip()) for line, record in records]
    refuse_rows(path, [(line, "(empty)") for line, file in files if not file], "have an empty file name")
    splits = _read_splits(path, records, split_index)
    if len(label_indices) == 1:
        values = [(line, record[label_indices[0]].strip()) for line, record in records]
        class_names, labels, multilabel, how = _parse_label_column(path, values, label_delimiter)
        how = f"labels from column {header[label_indices[0]]!r}{how}"
    else:
        class_names = [header[index].strip() for index in label_indices]
        labels, multilabel = _parse_one_hot(path, records, label_indices)
        how = f"one 0/1 column per class ({len(class_names)} columns), {'several' if multilabel else 'one'} per image"
    if len(class_names) < 2:
        raise UserInputError(f"{path} names {len(class_names)} class ({class_names}): a classifier needs two or more.")
    rows = [
        TableRow(line, file, split, label) for (line, file), split, label in zip(files, splits, labels, strict=True)
    ]
    how = f"files from column {header[file_index]!r}, {how}" + (
        f", splits from column {header[split_index]!r}" if split_index is not None else ""
    )
    return LabelTable(path, class_names, multilabel, rows, how)


def _read_records(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header and the (line number, fields) of every non-blank row; ragged rows are an error."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as file:
            text = file.read()
    except UnicodeDecodeError as error:
        raise UserInputError(f"{path} is not UTF-8 text ({error}): save it as UTF-8 (CSV UTF-8 in Excel).") from None
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return _json_lines_records(path, text)
    first_line = text.split("\n", 1)[0]
    separator = "\t" if path.suffix.lower() in (".tsv", ".tab") or "\t" in first_line else None
    separator = separator or max(",;", key=first_line.count)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=separator)
    records = []
    try:
        for fields in reader:
            if any(field.strip() for field in fields):
                records.append((reader.line_num, fields))
    except csv.Error as error:
        raise UserInputError(f"{path}, line {reader.line_num}: {error}. Fix the quoting of that row.") from None
    if not records:
        raise UserInputError(f"{path} is empty: it needs a header row and one row per image.")
    (_, header), records = records[0], records[1:]
    header = [name.strip() for name in header]
    if not records:
        raise UserInputError(f"{path} has a header but no rows.")
    ragged = [(line, f"{len(fields)} fields") for line, fields in records if len(fields) != len(header)]
    refuse_rows(path, ragged, f"have another number of fields than the header's {len(header)} ({header})")
    return header, records


def _json_lines_records(path: Path, text: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """A JSON Lines table (the Hub's ``metadata.jsonl``: one object per line) as header and fields: a list of
    labels becomes one field of names separated by ``;``."""
    objects = []
    for line, raw in enumerate(text.splitlines(), start=1):
        if raw.strip():
            try:
                value = json.loads(raw)
            except json.JSONDecodeError as error:
                raise UserInputError(f"{path}, line {line} is not JSON ({error.msg}): one object per line.") from None
            if not isinstance(value, dict):
                raise UserInputError(f"{path}, line {line} is not a JSON object: one object per line.")
            objects.append((line, value))
    if not objects:
        raise UserInputError(f"{path} is empty: it needs one JSON object per image.")
    header = list(dict.fromkeys(key for _, value in objects for key in value))

    def field(value: object) -> str:
        return ";".join(str(item) for item in value) if isinstance(value, list) else "" if value is None else str(value)

    return header, [(line, [field(value.get(key)) for key in header]) for line, value in objects]


def refuse_rows(path: Path, bad: list[tuple[int, str]], what: str, fix: str = "Fix or remove them.") -> None:
    """Stop with one message naming the first :data:`ROWS_SHOWN` bad rows (line, value) and their count."""
    if not bad:
        return
    shown = ", ".join(f"line {line} ({value})" for line, value in bad[:ROWS_SHOWN])
    more = f" and {len(bad) - ROWS_SHOWN} more" if len(bad) > ROWS_SHOWN else ""
    raise UserInputError(f"{len(bad)} row(s) of {path} {what}: {shown}{more}. {fix}")


def _read_splits(path: Path, records: list[tuple[int, list[str]]], index: int | None) -> list[str | None]:
    if index is None:
        return [None] * len(records)
    known = (("train", TRAIN_FOLDER_NAMES), ("val", VAL_FOLDER_NAMES), ("test", TEST_FOLDER_NAMES))
    names = {name: split for split, names in known for name in names}
    values = [(line, fields[index].strip()) for line, fields in records]
    splits = [names.get(value.lower().replace("-", "_").replace(" ", "_")) for _, value in values]
    bad = [(line, repr(value)) for (line, value), split in zip(values, splits, strict=True) if split is None]
    refuse_rows(path, bad, "have a split that is not train, val or test", "Use train, val or test.")
    if "train" not in splits:
        raise UserInputError(f"No row of {path} is in the train split: mark the training rows train.")
    return splits


def _one_hot_columns(header: list[str], records: list[tuple[int, list[str]]], taken: set) -> list[int]:
    """The columns (outside ``taken``) whose every value is 0 or 1: a one-hot table; [] when any is not."""
    others = [index for index in range(len(header)) if index not in taken]
    binary = FALSE_VALUES + TRUE_VALUES
    if len(others) >= 2 and all(fields[i].strip().lower() in binary for _, fields in records for i in others):
        return others
    return []


def _parse_one_hot(path: Path, records: list[tuple[int, list[str]]], indices: list[int]) -> tuple[list[Label], bool]:
    """Labels from 0/1 columns: class indices when every row has exactly one 1, else 0/1 tuples."""
    labels, bad = [], []
    for line, fields in records:
        values = [fields[i].strip().lower() for i in indices]
        if any(value not in FALSE_VALUES + TRUE_VALUES for value in values):
            bad.append((line, ",".join(values)))
        labels.append(tuple(int(value in TRUE_VALUES) for value in values))
    refuse_rows(path, bad, "have a class column that is not 0 or 1")
    if all(sum(label) == 1 for label in labels):
        return [label.index(1) for label in labels], False
    return labels, True


def _parse_label_column(
    path: Path, values: list[tuple[int, str]], delimiter: str
) -> tuple[list[str], list[Label], bool, str]:
    """(class names, labels, multilabel, how) from one column of class names."""
    refuse_rows(path, [(line, "(empty)") for line, value in values if not value], "have an empty label")
    delimiter = {"space": " ", "comma": ",", "semicolon": ";", "tab": "\t"}.get(delimiter, delimiter)
    if delimiter == "auto":
        delimiter = find_label_delimiter(path, [value for _, value in values])
    if delimiter in ("none", None):
        class_names = _sorted_names({value for _, value in values})
        index = {name: i for i, name in enumerate(class_names)}
        return class_names, [index[value] for _, value in values], False, ", one class per row"
    tokens = [[token.strip() for token in value.split(delimiter) if token.strip()] for _, value in values]
    empty = [(line, repr(value)) for (line, value), names in zip(values, tokens, strict=True) if not names]
    refuse_rows(path, empty, "have no label once split at the label delimiter")
    class_names = _sorted_names({token for names in tokens for token in names})
    index = {name: i for i, name in enumerate(class_names)}
    labels = []
    for names in tokens:
        present = [0] * len(class_names)
        for name in names:
            present[index[name]] = 1
        labels.append(tuple(present))
    return class_names, labels, True, f", several per row separated by {delimiter!r}"


def find_label_delimiter(path: Path, values: list[str]) -> str | None:
    """The delimiter of several labels in one field, or ``None`` when every field is one class name.

    ``;``, ``,`` and ``|`` delimit labels wherever they occur (two of them at once is an error: set
    ``data.label_delimiter``). A space delimits labels only when the words of the labels with spaces
    are a class vocabulary: one of them stands alone as a label too ("sea sunset" and "sea"), or
    there are more such labels than words (combinations of tags); otherwise, as with "golden
    retriever", "labrador retriever" and "pug", names with spaces are class names (the log says so).
    """
    present = [d for d in LABEL_DELIMITERS if any(d in value for value in values)]
    marks = [d for d in present if d != " "]
    if len(marks) > 1:
        raise UserInputError(
            f"The labels of {path} hold both {marks[0]!r} and {marks[1]!r}: set --data.label_delimiter to the one "
            "that separates labels (or none when each field is one class name)."
        )
    if marks:
        return marks[0]
    if not present:
        return None
    distinct = set(values)
    several = {value for value in distinct if " " in value}
    names = {token for value in several for token in value.split()}
    if distinct & names or len(several) > len(names):
        return " "
    rank_zero_info(
        f"The labels of {path} hold spaces but read as class names with spaces ({len(distinct)} classes, e.g. "
        f"{sorted(distinct)[0]!r}). If they are several labels per image, set --data.label_delimiter space."
    )
    return None


def _sorted_names(names: set[str]) -> list[str]:
    """Class names in label order: by number when every name is an integer ("2" before "10"), else by text."""
    if all(name.lstrip("-").isdigit() for name in names):
        return sorted(names, key=int)
    return sorted(names)
