"""One factory from the data settings to a :class:`~transfer_lightning.data.source.Source`, as timm's
``create_reader`` picks a reader by its argument: a stream, Parquet, a label table, class folders, or CIFAR-10."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from transfer_lightning.data.cifar10 import Cifar10Source, has_cifar10
from transfer_lightning.data.folders import FolderSource, find_split_folders
from transfer_lightning.data.parquet import ParquetSource
from transfer_lightning.data.settings import DEFAULT_DATA_DIR, default_cache_dir
from transfer_lightning.data.source import Source
from transfer_lightning.data.streaming import StreamSource
from transfer_lightning.data.table_source import TableSource
from transfer_lightning.errors import UserInputError


def open_source(
    data_dir: str | None = None,
    download: bool = True,
    class_names: list[str] | None = None,
    labels_file: str | None = None,
    images_dir: str | None = None,
    file_column: str | None = None,
    label_column: str | list[str] | None = None,
    split_column: str | None = None,
    label_delimiter: str = "auto",
    streaming_dir: str | None = None,
    max_cache_size: str = "50GB",
    storage_options: dict[str, Any] | None = None,
    parquet: str | list[str] | None = None,
    cache_dir: str | None = None,
    skip_bad_images: bool = False,
) -> Source:
    """The source the settings name (their meanings: :class:`~transfer_lightning.data.ImageFolderDataModule`).

    ``streaming_dir`` wins, then ``parquet``, then ``labels_file``; otherwise ``data_dir`` (default ``./data``) holds
    class folders or CIFAR-10's batches, which are downloaded there only when ``download`` is true and it is the
    default folder or an empty one: a mistyped path is an error, not a CIFAR-10 run.
    """
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    if streaming_dir is not None:
        return StreamSource(streaming_dir, storage_options, max_cache_size, cache, class_names)
    if parquet is not None:
        return ParquetSource.extract(parquet, cache, file_column, label_column, class_names, skip_bad_images)
    root = Path(data_dir).expanduser() if data_dir is not None else DEFAULT_DATA_DIR
    if data_dir is not None and not root.is_dir():
        raise UserInputError(
            f"data.data_dir {data_dir} does not exist. Point it at a folder of images (DIR/train/<class>/*.jpg "
            "and DIR/test/<class>/*.jpg, or DIR/<class>/*.jpg) or holding cifar-10-batches-py/, or leave it "
            f"unset for CIFAR-10 in ./{DEFAULT_DATA_DIR} (downloaded with data.download true)."
        )
    if labels_file is not None:
        columns = (file_column, label_column, split_column)
        named_dir = root if data_dir is not None else None
        return TableSource.open(
            labels_file, named_dir, images_dir, columns, label_delimiter, class_names, cache, skip_bad_images
        )
    folders = find_split_folders(root)
    if folders is not None:
        return FolderSource(root, folders, class_names, cache, skip_bad_images)
    downloads = download and (data_dir is None or (root.is_dir() and not any(root.iterdir())))
    if has_cifar10(root) or downloads:
        return Cifar10Source(root, downloads, class_names)
    raise UserInputError(
        f"No data in {root}: expected torchvision's CIFAR-10 folder "
        f"{root / 'cifar-10-batches-py'} or an image-folder tree such as "
        f"{root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg. Point --data.data_dir at "
        f"one of them, or leave it unset with --data.download true to fetch CIFAR-10 into ./{DEFAULT_DATA_DIR}."
    )


#: The data settings that name the source (the data module's other settings say how it is split, stored and batched).
SOURCE_SETTINGS = tuple(inspect.signature(open_source).parameters)
