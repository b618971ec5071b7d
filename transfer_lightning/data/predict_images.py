"""New images to predict on: a folder at any depth, or one file, decoded as the checkpoint's preprocessing says."""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info

from transfer_lightning.data.datasets import ImageTensorDataset
from transfer_lightning.data.store import ImageFolderStore
from transfer_lightning.data.transforms import Preprocessing
from transfer_lightning.errors import UserInputError


class NewImages:
    """``data.predict_dir``: images without labels, prepared exactly as the checkpoint's training images were.

    Args:
        folder: A folder of images at any depth, or one image file.
        cache_dir: Where their decoded store goes.
    """

    def __init__(self, folder: Path, cache_dir: Path) -> None:
        if not folder.exists():
            raise UserInputError(f"data.predict_dir {folder} does not exist: pass a folder of images or an image.")
        self.folder, self.cache_dir = folder, cache_dir
        #: The preprocessing the checkpoint records (set when it is loaded); older checkpoints record none.
        self.checkpoint_preprocessing: Preprocessing | None = None
        #: How :meth:`load` prepared them, for the batches.
        self.preprocessing: Preprocessing | None = None
        #: Each image's path as predictions.csv shows it (relative to the folder), once loaded.
        self.paths: list[str] | None = None

    def load(self, preprocessing: Preprocessing) -> ImageTensorDataset:
        """The images decoded as ``preprocessing`` says, undecodable ones skipped (and listed in the store)."""
        stored = ImageFolderStore(self.folder, None, self.cache_dir, skip_bad_images=True).load(*preprocessing.decoding)
        self.preprocessing = preprocessing
        self.paths = [
            os.path.relpath(stored.files[row], self.folder) if self.folder.is_dir() else str(self.folder)
            for row in stored.rows.tolist()
        ]
        rank_zero_info(f"Predicting {len(self.paths)} images under {self.folder}.")
        return ImageTensorDataset(stored.arrays, stored.rows)
