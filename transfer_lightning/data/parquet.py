"""Parquet data sets as the Hugging Face Hub writes them (``data/train-00000-of-00001.parquet``, ...).

An image column holds ``{bytes, path}`` structs (the ``datasets`` library's ``Image`` feature), a label column
class indices, whose names the file's ``huggingface`` schema metadata gives (a ``ClassLabel`` feature; a list of
them for several labels per image), or class names. The files are read once with pyarrow into the cache: every
image as a file, and a label table (``labels.csv``: file, label, and the split each file's name says) that then
goes the way of every label table: into the decoded store, or into ``optimize``.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info

from transfer_lightning.data.folders import TEST_FOLDER_NAMES, TRAIN_FOLDER_NAMES, VAL_FOLDER_NAMES
from transfer_lightning.data.table_source import TableSource
from transfer_lightning.errors import UserInputError
from transfer_lightning.files import temporary_path
from transfer_lightning.logs import progress_bar

#: Rows read from a file at a time.
BATCH_ROWS = 512
#: Image column names looked for when no column is a ``datasets`` Image feature.
IMAGE_COLUMNS = ("image", "img", "picture", "photo", "pixel_values")
LABEL_COLUMNS = ("label", "labels", "fine_label", "coarse_label", "class", "target", "category", "tags")
#: What separates several class names in the table's label field: the first that no class name contains.
DELIMITERS = (";", "|", ",")


def parquet_files(spec: str | list[str]) -> list[Path]:
    """The Parquet files ``spec`` names: files, glob patterns (``data/train-*.parquet``) or folders (every
    ``*.parquet`` under them), sorted; one line when it names none."""
    found: list[Path] = []
    for item in [spec] if isinstance(spec, str) else spec:
        path = Path(item).expanduser()
        if path.is_dir():
            found += sorted(path.rglob("*.parquet"))
        elif any(char in item for char in "*?["):
            found += sorted(Path(match) for match in glob.glob(str(path), recursive=True))
        elif path.is_file():
            found.append(path)
        else:
            raise UserInputError(f"data.parquet {item} does not exist: name Parquet files, a folder or a pattern.")
    if not found:
        raise UserInputError(f"data.parquet {spec} names no .parquet file.")
    return found


def split_of(path: Path) -> str | None:
    """train, val or test from a file's name as the Hub writes it (``validation-00000-of-00002.parquet``), or
    from its folder's name (``train/0000.parquet``); None when neither says."""
    splits = {name: split for split, names in SPLIT_NAMES.items() for name in names}
    for word in (path.stem.split("-")[0].lower(), path.parent.name.lower()):
        if word in splits:
            return splits[word]
    return None


SPLIT_NAMES = {"train": TRAIN_FOLDER_NAMES, "val": VAL_FOLDER_NAMES, "test": TEST_FOLDER_NAMES}


def hub_features(schema: Any) -> dict[str, Any]:
    """The ``datasets`` features of a file (its ``huggingface`` schema metadata), or {} without them."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if not raw:
        return {}
    info = json.loads(raw)
    return info.get("info", {}).get("features", {}) or {}


def find_columns(
    path: Path, schema: Any, image_column: str | None, label_column: str | None
) -> tuple[str, str, list[str] | None, bool]:
    """(image column, label column, class names or None, several labels per image) of a file; one line each
    when a column is missing."""
    features, names = hub_features(schema), schema.names
    if image_column is None:
        typed = [name for name, feature in features.items() if _type(feature) == "Image"]
        structs = [field.name for field in schema if _is_image_struct(field.type)]
        image_column = next(iter(typed + [n for n in IMAGE_COLUMNS if n in names and n in structs] + structs), None)
    if image_column is None or image_column not in names:
        raise UserInputError(
            f"{path} has no image column (a struct of bytes and path, as the Hub stores images): its columns are "
            f"{names}. Name it with --data.file_column."
        )
    if label_column is None:
        typed = [name for name, feature in features.items() if _class_names(feature) is not None]
        label_column = next(iter(typed + [name for name in LABEL_COLUMNS if name in names]), None)
    if label_column is None or label_column not in names:
        raise UserInputError(f"{path} has no label column: its columns are {names}. Name it with --data.label_column.")
    feature = features.get(label_column)
    multilabel = feature is not None and (isinstance(feature, list) or _type(feature) in ("Sequence", "List"))
    return image_column, label_column, _class_names(feature), multilabel


def _type(feature: Any) -> str | None:
    return feature.get("_type") if isinstance(feature, dict) else None


def _class_names(feature: Any) -> list[str] | None:
    """The names of a ClassLabel feature, or of the ClassLabel inside a Sequence / list of them."""
    if isinstance(feature, list) and feature:
        return _class_names(feature[0])
    if _type(feature) in ("Sequence", "List"):
        return _class_names(feature.get("feature"))
    return list(feature["names"]) if _type(feature) == "ClassLabel" else None


def _is_image_struct(arrow_type: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_struct(arrow_type) and "bytes" in [
        arrow_type.field(i).name for i in range(arrow_type.num_fields)
    ]


def extract_parquet(
    spec: str | list[str], cache_dir: Path, image_column: str | None = None, label_column: str | None = None
) -> tuple[Path, str]:
    """The label table of the Parquet data set ``spec`` in the cache (extracted first, once per version of the
    files), and the delimiter between several labels in it. Written under a temporary name and renamed: an
    interrupted extraction leaves nothing that a later run would take for whole."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserInputError(
            "data.parquet needs pyarrow: install the parquet extra (pip install -e '.[parquet]')."
        ) from None
    files = parquet_files(spec)
    digest = hashlib.sha256(f"{image_column}\0{label_column}".encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    folder = cache_dir / "parquet" / digest.hexdigest()[:16]
    table = folder / "labels.csv"
    rank_zero_info(f"Parquet data set {', '.join(str(path) for path in files[:3])}{' ...' if len(files) > 3 else ''}"
                   f" ({len(files)} file(s)), read into {folder}")  # fmt: skip
    if table.is_file():
        return table, (folder / "delimiter.txt").read_text()
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = temporary_path(folder)
    try:
        delimiter = _extract(files, partial, image_column, label_column, pq)
        os.replace(partial, folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return table, delimiter


def _extract(files: list[Path], folder: Path, image_column: str | None, label_column: str | None, pq: Any) -> str:
    (folder / "images").mkdir(parents=True)
    rows: list[tuple[str, list[str], str | None]] = []
    splits = [split_of(path) for path in files]
    with_splits = "train" in splits
    total = sum(pq.ParquetFile(path).metadata.num_rows for path in files)
    with progress_bar(total=total, desc="Reading the Parquet files", unit="img") as progress:
        for path, split in zip(files, splits, strict=True):
            if with_splits and split is None:
                raise UserInputError(
                    f"{path.name} does not say its split (train-, validation-, test-...) while other files do: "
                    "rename it, or give only the files of one split."
                )
            parquet = pq.ParquetFile(path)
            image, label, names, _ = find_columns(path, parquet.schema_arrow, image_column, label_column)
            start = 0
            for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=[image, label]):
                pictures, values = batch.column(image).to_pylist(), batch.column(label).to_pylist()
                for row, picture, value in zip(range(start, start + batch.num_rows), pictures, values, strict=True):
                    file = _write_image(folder / "images", path, row, picture)
                    rows.append((file, _label_names(path, row, value, names), split if with_splits else None))
                start += batch.num_rows
                progress.update(batch.num_rows)
    classes = {name for _, labels, _ in rows for name in labels}
    delimiter = next((d for d in DELIMITERS if not any(d in name for name in classes)), None)
    if delimiter is None:
        raise UserInputError(f"The class names of {files[0].parent} hold ; | and , alike: rename some of them.")
    with open(folder / "labels.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["file", "label"] + (["split"] if with_splits else []))
        for name, labels, split in rows:
            writer.writerow([name, delimiter.join(labels)] + ([split] if with_splits else []))
    several = any(len(labels) != 1 for _, labels, _ in rows)
    (folder / "delimiter.txt").write_text(delimiter if several else "none")
    return delimiter if several else "none"


def _write_image(images: Path, source: Path, row: int, picture: Any) -> str:
    """Write one embedded image as a file named after its Parquet file and row (so messages can name both)."""
    data = picture.get("bytes") if isinstance(picture, dict) else picture
    if not isinstance(data, bytes | bytearray) or not data:
        raise UserInputError(
            f"{source}, row {row}: the image column holds no image bytes ({type(data).__name__}); only Parquet "
            "files with embedded images are read (the Hub's default)."
        )
    suffix = Path(picture.get("path") or "").suffix if isinstance(picture, dict) else ""
    name = f"{source.stem}-{row:08d}{suffix or '.img'}"
    (images / name).write_bytes(data)
    return f"images/{name}"


def _label_names(path: Path, row: int, value: Any, names: list[str] | None) -> list[str]:
    """The class names of one row's label: a class index (named by the metadata), a name, or a list of them."""
    values = value if isinstance(value, list) else [value]
    if value is None or any(item is None or (isinstance(item, int) and item < 0) for item in values):
        raise UserInputError(
            f"{path}, row {row} has no label ({value!r}; the Hub writes -1 for unlabelled rows): give only labelled "
            "files (the test split of some Hub data sets is unlabelled)."
        )
    if names is not None:
        if any(not isinstance(item, int) or item >= len(names) for item in values):
            raise UserInputError(f"{path}, row {row}: label {value!r} is not one of the {len(names)} classes.")
        return [names[item] for item in values]
    return [str(item) for item in values]


class ParquetSource(TableSource):
    """Parquet files as the Hugging Face Hub writes them, read once into a label table and its image files in the
    cache (:func:`extract_parquet`); their splits come from the files' names."""

    @classmethod
    def extract(
        cls,
        spec: str | list[str],
        cache_dir: Path,
        image_column: str | None,
        label_column: str | None,
        given: list[str] | None,
        skip_bad_images: bool,
    ) -> ParquetSource:
        table, delimiter = extract_parquet(spec, cache_dir, image_column, label_column)
        source = cls.open(str(table), None, None, (None, None, None), delimiter, given, cache_dir, skip_bad_images)
        source.spec = spec
        return source

    def describe(self) -> str:
        files = self.spec if isinstance(self.spec, str) else ", ".join(self.spec)
        return f"Parquet {files} ({len(self.table.rows)} rows, read into {self.images_dir})"
