"""New images to predict on: a folder at any depth, or one file, decoded as the checkpoint says."""

from __future__ import annotations

import os
from pathlib import Path

from transfer_lightning.data.datasets import ImageTensorDataset
from transfer_lightning.data.store import ImageFolderStore
from transfer_lightning.data.transforms import Decoding


def predict_images(predict_dir: Path, cache_dir: Path, decoding: Decoding) -> tuple[ImageTensorDataset, list[str]]:
    """The images of ``predict_dir`` (any nesting, or one file) decoded as ``decoding`` says, undecodable ones
    skipped, and the path of each as predictions.csv shows it (relative to ``predict_dir``)."""
    stored = ImageFolderStore(predict_dir, None, cache_dir, skip_bad_images=True).load(*decoding)
    paths = [
        os.path.relpath(stored.files[row], predict_dir) if predict_dir.is_dir() else str(predict_dir)
        for row in stored.rows.tolist()
    ]
    return ImageTensorDataset(stored.arrays, stored.rows), paths
