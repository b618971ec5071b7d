"""Class-folder trees as a source: their layout, their classes and their pools of images.

An image-folder tree is recognised in one of these layouts (class names are the sorted folder
names, and must be the same in every split folder; split folders go by their common names in
any case, e.g. ``Training/``, ``training_set/``, ``validation/``, ``test_set/``):

- ``DIR/train/<class>/*`` + ``DIR/test/<class>/*``: validation is carved out of train;
- ``DIR/train/`` + ``DIR/val/`` (or ``valid/``): val validates, and also tests when there is no ``test/``;
- ``DIR/train/`` + ``DIR/val/`` + ``DIR/test/``;
- ``DIR/<class>/*``: one pool; validation is carved out of it and also tests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torchvision
from lightning.pytorch.utilities import rank_zero_info

from transfer_lightning.data.listing import find_classes, is_hidden_or_system, list_images
from transfer_lightning.data.source import FileSource, Samples
from transfer_lightning.data.splits import Pools
from transfer_lightning.errors import UserInputError
from transfer_lightning.tasks import TaskName

#: Names of split folders, compared in lower case with "-" and " " read as "_", in the order they are looked for.
TRAIN_FOLDER_NAMES = ("train", "training", "train_set", "training_set", "trainset")
VAL_FOLDER_NAMES = ("val", "valid", "validation", "val_set", "valid_set", "validation_set", "dev")
TEST_FOLDER_NAMES = ("test", "testing", "test_set", "testing_set", "testset")


@dataclass(frozen=True)
class SplitFolders:
    """The class-folder trees of an image-folder data set; ``None`` where the layout has no such folder."""

    train: Path
    val: Path | None
    test: Path | None

    @property
    def folders(self) -> list[Path]:
        return [folder for folder in (self.train, self.val, self.test) if folder is not None]


def find_split_folders(root: Path) -> SplitFolders | None:
    """The layout of an image-folder tree under ``root``, or ``None`` when ``root`` is not one.

    Split folders are recognised by their common names in any case (``train``, ``Training``,
    ``training_set``; ``val``, ``valid``, ``validation``; ``test``, ``testing``, ``test_set``). Raises
    :class:`UserInputError` for a tree that has val or test folders but no train folder, and for
    class folders that hold only folders of the same names (split folders under other names).
    """
    if not root.is_dir() or (root / torchvision.datasets.CIFAR10.base_folder).is_dir():
        return None
    folders = sorted((child for child in root.iterdir() if child.is_dir()), key=lambda path: path.name)
    folders = [folder for folder in folders if not is_hidden_or_system(folder.name)]
    by_name = {}
    for folder in folders:
        by_name.setdefault(folder.name.lower().replace("-", "_").replace(" ", "_"), folder)
    train, val, test = (
        next((by_name[name] for name in names if name in by_name), None)
        for names in (TRAIN_FOLDER_NAMES, VAL_FOLDER_NAMES, TEST_FOLDER_NAMES)
    )
    if train is not None:
        return SplitFolders(train, val, test)
    if val is not None or test is not None:
        found = ", ".join(f"{folder.name}/" for folder in (val, test) if folder is not None)
        raise UserInputError(
            f"{root} holds {found} but no training folder: name the folder of training images train/ "
            "(or training/, training_set/), beside the others."
        )
    if not folders:
        return None
    _check_not_split_folders(root, folders)
    return SplitFolders(root, None, None)


def _check_not_split_folders(root: Path, folders: list[Path]) -> None:
    """Refuse class folders that hold no images of their own, only folders of the same names in each:
    such a tree is split folders under other names (``part1/cats``, ``part2/cats``), not classes."""
    inner = []
    for folder in folders:
        entries = [entry for entry in os.scandir(folder) if not is_hidden_or_system(entry.name)]
        if not entries or any(not entry.is_dir() for entry in entries):
            return
        inner.append({entry.name for entry in entries})
    shared = set.intersection(*inner)
    if shared:
        raise UserInputError(
            f"The folders of {root} ({', '.join(f.name for f in folders)}) hold only folders "
            f"({', '.join(sorted(shared))}), not images: this looks like split folders, not classes. Name them "
            "train/ and test/ (or val/), each holding one folder per class, or point --data.data_dir at one of them."
        )


def image_folder_classes(folders: SplitFolders) -> list[str]:
    """Class names shared by every split folder (sorted sub-folder names, hidden and system folders skipped)."""
    classes = find_classes(folders.train)
    for other in folders.folders[1:]:
        other_classes = find_classes(other)
        if other_classes != classes:
            differ = sorted(set(classes) ^ set(other_classes))
            raise UserInputError(
                f"{folders.train} and {other} have different class folders (only in one: {', '.join(differ)}). "
                "Every split folder must hold the same class names."
            )
    if len(classes) < 2:
        raise UserInputError(f"{folders.train} needs at least two class folders, found {classes}.")
    return classes


class FolderSource(FileSource):
    """A tree of class folders, with or without split folders (see the module's docstring)."""

    def __init__(
        self, root: Path, folders: SplitFolders, given: list[str] | None, cache_dir: Path, skip_bad_images: bool
    ) -> None:
        super().__init__(cache_dir, skip_bad_images)
        self.root, self.folders = root, folders
        self.class_names = image_folder_classes(folders)
        if given is not None and list(given) != self.class_names:
            raise UserInputError(
                f"data.class_names {list(given)} differ from the class folders of {root}: {self.class_names}. "
                "Leave data.class_names unset to use the folders'."
            )

    @property
    def task(self) -> TaskName:
        return "multiclass"

    def describe(self) -> str:
        splits = ", ".join(f"{folder.name}/" for folder in self.folders.folders if folder != self.root)
        return f"class folders under {self.root} ({len(self.class_names)} classes{'; ' + splits if splits else ''})"

    @cached_property
    def _sample_pools(self) -> Pools[Samples]:
        pools = []
        for folder in (self.folders.train, self.folders.val, self.folders.test):
            if folder is None:
                pools.append(None)
                continue
            samples, left_out = list_images(folder, self.class_names)
            left_out_line = left_out.describe(folder)
            if left_out_line:
                rank_zero_info(left_out_line)
            pools.append(Samples(samples, folder))
        names = tuple(
            str(folder) if folder else None for folder in (self.folders.train, self.folders.val, self.folders.test)
        )
        return Pools(*pools, names=names, no_test="no test folder")

    def sample_pools(self) -> Pools[Samples]:
        return self._sample_pools
