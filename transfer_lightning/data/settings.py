"""The data module's settings: checked once, and defaulted."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from transfer_lightning.data.transforms import NORMALIZATIONS
from transfer_lightning.errors import UserInputError

ClassBalance = Literal["none", "sampler", "loss"]


def check_data_settings(
    batch_size: int,
    num_workers: int,
    val_size: int | float,
    image_size: int | str | None,
    crop_scale: tuple[float, float],
    normalization: str,
    class_balance: str,
) -> None:
    """Refuse values of the data module's arguments that are out of range, each in one line."""
    if batch_size < 1:
        raise UserInputError(f"batch_size must be at least 1, got {batch_size}.")
    if num_workers < 0:
        raise UserInputError(f"num_workers must be 0 or more, got {num_workers}.")
    if val_size < 0:
        raise UserInputError(f"val_size must be 0 or more, got {val_size}.")
    if image_size is not None and image_size != "auto" and (not isinstance(image_size, int) or image_size < 1):
        raise UserInputError(f"image_size must be a positive number of pixels, auto or null, got {image_size!r}.")
    if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
        raise UserInputError(f"crop_scale must be two fractions 0 < low <= high <= 1, got {list(crop_scale)}.")
    if normalization != "auto" and normalization not in NORMALIZATIONS:
        raise UserInputError(
            f"normalization must be auto or one of {', '.join(NORMALIZATIONS)}, got {normalization!r}."
        )
    if class_balance not in ("none", "sampler", "loss"):
        raise UserInputError(f"class_balance must be none, sampler or loss, got {class_balance!r}.")


#: Where CIFAR-10 is read from, and downloaded to, when data.data_dir is not set.
DEFAULT_DATA_DIR = Path("data")


def default_cache_dir() -> Path:
    """Where decoded stores and features go unless ``data.cache_dir`` says: ``$XDG_CACHE_HOME/transfer_lightning``."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "transfer_lightning"
