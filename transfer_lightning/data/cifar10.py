"""CIFAR-10 in torchvision's python batches as a source: read, named, and downloaded where asked."""

from __future__ import annotations

import pickle
import shutil
import urllib.error
from pathlib import Path

import numpy as np
import torch
import torchvision

from transfer_lightning.data.datasets import ImageArrays, ImageTensorDataset
from transfer_lightning.data.source import LocalSource
from transfer_lightning.data.splits import Pools
from transfer_lightning.data.transforms import Decoding, View
from transfer_lightning.errors import UserInputError
from transfer_lightning.tasks import TaskName

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def has_cifar10(root: Path) -> bool:
    return (root / torchvision.datasets.CIFAR10.base_folder).is_dir()


class Cifar10Source(LocalSource):
    """CIFAR-10's batches under ``root``: 50,000 training and 10,000 test images of 32x32; ``downloads``: fetched
    into ``root`` by :meth:`prepare` first."""

    def __init__(self, root: Path, downloads: bool, given: list[str] | None) -> None:
        self.root, self.downloads = root, downloads
        if given is not None and len(given) != len(CIFAR10_CLASSES):
            raise UserInputError(f"CIFAR-10 has 10 classes; data.class_names gives {len(given)}.")
        self.class_names = list(given) if given is not None else list(CIFAR10_CLASSES)

    @property
    def task(self) -> TaskName:
        return "multiclass"

    def describe(self) -> str:
        return f"CIFAR-10's python batches in {self.root / torchvision.datasets.CIFAR10.base_folder}"

    def stored_size(self, image_size: int | None, crop_pct: float) -> tuple[tuple[int, int], View]:
        return (32, 32), "resize"

    def prepare(self, decoding: Decoding, val_size: int | float) -> None:
        if self.downloads and not has_cifar10(self.root):
            download_cifar10(self.root)

    def pools(self, decoding: Decoding) -> Pools[ImageTensorDataset]:
        source = cifar10_source(self.root)
        pools = []
        for split, train in (("train", True), ("test", False)):
            arrays = read_cifar10_batches(self.root, train=train)
            # An image's position in the official batches (the index of the PNG copies' file names).
            names = [f"{split} {index:05d}" for index in range(len(arrays.labels))]
            pools.append(ImageTensorDataset(arrays, source=f"{source} {split}", names=names))
        train, test = pools
        names = (f"{self.root} (CIFAR-10 training batches)", None, f"{self.root} (test batch)")
        return Pools(train, None, test, names=names)


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
