"""The data module's settings: checked once, defaulted, and the class names they imply."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from transfer_lightning.data.sources import CIFAR10_CLASSES, SplitFolders, image_folder_classes
from transfer_lightning.data.tables import LabelTable
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


def resolve_class_names(
    given: list[str] | None,
    table: LabelTable | None,
    folders: SplitFolders | None,
    data_dir: Path,
    predicting: bool,
    cifar10_available: bool,
) -> list[str]:
    """The class names, in label order: the table's, the class folders', or CIFAR-10's; ``given`` names
    (``data.class_names``) must agree with them, and predicting new images takes them as they are."""
    if predicting and given is not None:
        return list(given)  # predicting needs no training data
    if table is not None or folders is not None:
        if table is not None:
            found, source, whose = table.class_names, f"the classes of {table.path}", "the table's"
        else:
            found, source, whose = image_folder_classes(folders), f"the class folders of {data_dir}", "the folders"
        if given is not None and list(given) != found:
            raise UserInputError(
                f"data.class_names {list(given)} differ from {source}: {found}. "
                f"Leave data.class_names unset to use {whose}."
            )
        return found
    if given is not None:
        if len(given) != len(CIFAR10_CLASSES):
            raise UserInputError(f"CIFAR-10 has 10 classes; data.class_names gives {len(given)}.")
        return list(given)
    if cifar10_available:
        return list(CIFAR10_CLASSES)
    raise UserInputError(
        f"No data in {data_dir}: expected torchvision's CIFAR-10 folder "
        f"{data_dir / 'cifar-10-batches-py'} or an image-folder tree such as "
        f"{data_dir}/train/<class>/*.jpg and {data_dir}/val/<class>/*.jpg. Point --data.data_dir at "
        f"one of them, or leave it unset with --data.download true to fetch CIFAR-10 into ./{DEFAULT_DATA_DIR}."
    )
