"""The decoded stores of a data set's train, val and test pools (split folders, or split rows of a label table)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from transfer_lightning.data.datasets import ImageTensorDataset
from transfer_lightning.data.sources import SplitFolders
from transfer_lightning.data.store import ImageFolderStore
from transfer_lightning.data.table_source import TableSource
from transfer_lightning.data.transforms import Decoding


class SplitStores(NamedTuple):
    """The stores of the train, val and test folders (or rows of a table); ``None`` where there are none."""

    train: ImageFolderStore
    val: ImageFolderStore | None
    test: ImageFolderStore | None


def make_split_stores(
    table: TableSource | None,
    folders: SplitFolders | None,
    class_names: list[str],
    cache_dir: Path,
    skip_bad_images: bool,
) -> SplitStores:
    """One :class:`ImageFolderStore` per pool that the label table's rows or the split folders have."""
    if table is not None:
        images, stem = table.images_dir, table.table.path.stem
        return SplitStores(
            *(
                ImageFolderStore(images, None, cache_dir, skip_bad_images, split[1], f"{stem}-{split[0]}")
                if split
                else None
                for split in table.split_samples()
            )
        )
    return SplitStores(
        *(
            ImageFolderStore(folder, class_names, cache_dir, skip_bad_images) if folder else None
            for folder in (folders.train, folders.val, folders.test)
        )
    )


def pool_names(table: TableSource | None, folders: SplitFolders | None) -> list[str | None]:
    """How the log names the train, val and test pools of folders or of a table."""
    if table is not None:
        return table.pool_names()
    return [str(folder) if folder else None for folder in (folders.train, folders.val, folders.test)]


def predict_images(predict_dir: Path, cache_dir: Path, decoding: Decoding) -> tuple[ImageTensorDataset, list[str]]:
    """The images of ``predict_dir`` (any nesting, or one file) decoded as ``decoding`` says, undecodable ones
    skipped, and the path of each as predictions.csv shows it (relative to ``predict_dir``)."""
    stored = ImageFolderStore(predict_dir, None, cache_dir, skip_bad_images=True).load(*decoding)
    paths = [
        os.path.relpath(stored.files[row], predict_dir) if predict_dir.is_dir() else str(predict_dir)
        for row in stored.rows.tolist()
    ]
    return ImageTensorDataset(stored.arrays, stored.rows), paths
