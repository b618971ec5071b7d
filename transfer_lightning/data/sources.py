"""Where the images come from: torchvision's CIFAR-10 files, or a tree of class folders.

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
import pickle
import shutil
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision

from transfer_lightning.data.datasets import ImageArrays
from transfer_lightning.data.listing import find_classes, is_hidden_or_system
from transfer_lightning.errors import UserInputError

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

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


def read_cifar10_batches(root: Path, train: bool) -> ImageArrays:
    """Read ``cifar-10-batches-py`` pickles under ``root`` (the format torchvision downloads).

    Not through ``torchvision.datasets.CIFAR10``: its constructor refuses any file whose MD5 differs
    from the original download's, so a re-packed or shortened copy (the tests' small ones among them)
    would not load, and it returns channels-last arrays to be transposed. The download, where the MD5
    matters, does go through it (:func:`download_cifar10`); a file that does not unpickle is reported here.
    """
    folder = root / torchvision.datasets.CIFAR10.base_folder
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    images, labels = [], []
    for name in names:
        try:
            with open(folder / name, "rb") as file:
                entry = pickle.load(file, encoding="latin1")
            images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(entry["labels"])
        except (OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError) as error:
            raise UserInputError(
                f"Cannot read {folder / name} ({error}). Delete {folder} and run again with --data.download true, "
                "or point --data.data_dir at an image-folder tree."
            ) from None
    return ImageArrays(torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.int64))


def cifar10_source(root: Path) -> str:
    """Names CIFAR-10's files under ``root`` with their sizes and modification times (changes when they do)."""
    folder = root / torchvision.datasets.CIFAR10.base_folder
    stats = [(path.name, path.stat().st_size, path.stat().st_mtime_ns) for path in sorted(folder.iterdir())]
    return f"cifar10 {folder.resolve()} {stats}"


def download_cifar10(root: Path) -> None:
    """Fetch and verify CIFAR-10 with torchvision; offline, remove what the attempt made and say what to do."""
    made = next((folder for folder in [*reversed(root.parents), root] if not folder.exists()), None)
    before = set(root.iterdir()) if made is None else set()
    try:
        torchvision.datasets.CIFAR10(root, train=True, download=True)
    except (urllib.error.URLError, OSError, RuntimeError) as error:
        if made is not None:  # the first folder of root's path that the download created
            shutil.rmtree(made, ignore_errors=True)
        else:
            for leftover in set(root.iterdir()) - before:
                if leftover.is_dir():
                    shutil.rmtree(leftover)
                else:
                    leftover.unlink()
        raise UserInputError(
            f"Could not download CIFAR-10 from {torchvision.datasets.CIFAR10.url} ({error}).\n"
            f"Offline? Either extract cifar-10-python.tar.gz into {root} (giving {root / 'cifar-10-batches-py'}), "
            "or point --data.data_dir at an image-folder tree DIR/{train,test}/<class>/*.png. "
            "Both can go into a config file, as configs/overrides/shared_mobilenet_v2.yaml of this repository shows."
        ) from error
