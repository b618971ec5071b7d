"""CIFAR-10 (or any class-folder image tree) as uint8 tensors, honest splits, batch transforms.

Images are decoded once into one ``uint8`` tensor per split (cached on disk for image folders),
batches are built by indexing that tensor, and normalisation, augmentation and resizing run on
whole batches on the training device in :meth:`CIFAR10DataModule.on_after_batch_transfer`. No
image is decoded or converted per sample per epoch.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
import urllib.error
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, NamedTuple

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset, pil_loader
from torchvision.transforms.functional import pil_to_tensor
from tqdm import tqdm

from transfer_lightning.errors import UserInputError

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

#: Per-channel (mean, std) presets. ``reference`` is the published recipe's mean = std = 0.5.
NORMALIZATIONS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "reference": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
Normalization = Literal["imagenet", "cifar10", "reference"]


class ImageArrays(NamedTuple):
    """A whole split in memory: ``images`` uint8 (N, 3, H, W), ``labels`` int64 (N,)."""

    images: Tensor
    labels: Tensor

    def subset(self, indices: Tensor) -> ImageArrays:
        return ImageArrays(self.images[indices], self.labels[indices])


class ImageTensorDataset(Dataset):
    """Serves whole batches from :class:`ImageArrays` by indexing (``__getitems__``), not per sample."""

    def __init__(self, arrays: ImageArrays) -> None:
        self.arrays = arrays

    def __len__(self) -> int:
        return len(self.arrays.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.arrays.images[index], self.arrays.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        index = torch.as_tensor(indices)
        return self.arrays.images[index], self.arrays.labels[index]


class EpochShuffleSampler(Sampler[int]):
    """A random order that depends only on (seed, epoch), so a resumed run sees the same batches.

    ``RandomSampler`` draws from the global random state, which a checkpoint does not restore;
    Lightning calls :meth:`set_epoch` at the start of every epoch.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


def keep_batch(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Collate function for :class:`ImageTensorDataset`: its ``__getitems__`` already built the batch."""
    return batch


# ---------------------------------------------------------------------------------------------
# Sources: torchvision's CIFAR-10 download format, or an image-folder tree.


def read_cifar10_batches(root: Path, train: bool) -> ImageArrays:
    """Read ``cifar-10-batches-py`` pickles under ``root`` (the format torchvision downloads).

    We read the pickles ourselves instead of through ``torchvision.datasets.CIFAR10`` because that
    class insists on the MD5 sums of the original files, and we want the raw uint8 array anyway.
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


def download_cifar10(root: Path) -> None:
    """Fetch and verify CIFAR-10 with torchvision; offline, fail with what to do instead."""
    try:
        torchvision.datasets.CIFAR10(root, train=True, download=True)
    except (urllib.error.URLError, OSError, RuntimeError) as error:
        raise UserInputError(
            f"Could not download CIFAR-10 from {torchvision.datasets.CIFAR10.url} ({error}).\n"
            f"Offline? Either extract cifar-10-python.tar.gz into {root} (giving {root / 'cifar-10-batches-py'}), "
            "or point --data.data_dir at an image-folder tree DIR/{train,test}/<class>/*.png."
        ) from error


def image_folder_classes(root: Path) -> list[str]:
    """Class names of ``root/train`` and ``root/test`` (sorted sub-folder names; must agree)."""
    train_classes, _ = find_classes(root / "train")
    if (root / "test").is_dir():
        test_classes, _ = find_classes(root / "test")
        if test_classes != train_classes:
            differ = sorted(set(train_classes) ^ set(test_classes))
            raise UserInputError(
                f"{root}/train and {root}/test have different class folders (only in one: {', '.join(differ)}). "
                "Both must hold the same class names."
            )
    if len(train_classes) < 2:
        raise UserInputError(f"{root}/train needs at least two class folders, found {train_classes}.")
    return train_classes


def read_image_folder(folder: Path, classes: list[str], cache_dir: Path) -> ImageArrays:
    """Decode ``folder/<class>/*`` into :class:`ImageArrays`, once: later calls read a cache file.

    The cache file's name is a hash of the folder's path and of every file's name, size and
    modification time, so a changed source gets a new cache. It is written atomically.
    Raises :class:`UserInputError` for an empty class folder, a file that does not decode, or images
    of different sizes.
    """
    try:
        samples = make_dataset(folder, {name: i for i, name in enumerate(classes)}, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as error:
        raise UserInputError(
            f"{error}. Every class folder under {folder} needs at least one image ({', '.join(IMG_EXTENSIONS)})."
        ) from None
    cache_file = cache_dir / f"{folder.name}-{_fingerprint(folder, samples)}.pt"
    if cache_file.is_file():
        cached = torch.load(cache_file, weights_only=True)
        return ImageArrays(cached["images"], cached["labels"])

    images = [_decode(path) for path, _ in tqdm(samples, desc=f"Decoding {folder}", unit="img", mininterval=1)]
    sizes = {tuple(image.shape) for image in images}
    if len(sizes) > 1:
        examples = ", ".join(f"{height}x{width}" for _, height, width in sorted(sizes)[:3])
        raise UserInputError(
            f"Images under {folder} have different sizes ({examples}, ...). "
            "Resize them all to one size first; --data.image_size then resizes batches for the backbone."
        )
    arrays = ImageArrays(torch.stack(images), torch.tensor([label for _, label in samples], dtype=torch.int64))
    save_atomically({"images": arrays.images, "labels": arrays.labels}, cache_file)
    return arrays


def save_atomically(obj: object, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            torch.save(obj, file)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _fingerprint(folder: Path, samples: list[tuple[str, int]]) -> str:
    digest = hashlib.sha256(str(folder.resolve()).encode())
    for path, label in samples:
        stat = os.stat(path)
        digest.update(f"{os.path.relpath(path, folder)}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _decode(path: str) -> Tensor:
    try:
        return pil_to_tensor(pil_loader(path))  # the decoder of torchvision's ImageFolder
    except (OSError, ValueError) as error:
        raise UserInputError(
            f"Cannot decode image {path} ({error}). Remove or replace this file and run again."
        ) from None


# ---------------------------------------------------------------------------------------------
# Splits and batch transforms.


def stratified_split(labels: Tensor, val_size: int, seed: int) -> tuple[Tensor, Tensor]:
    """Split indices of ``labels`` into (train, val), ``val_size`` of them for val, per-class proportional.

    The same ``seed`` gives the same split on every machine. Both index tensors are sorted.
    """
    if not 0 < val_size < len(labels):
        raise UserInputError(
            f"val_size must be between 1 and {len(labels) - 1} (the training set has {len(labels)} images), "
            f"got {val_size}."
        )
    generator = torch.Generator().manual_seed(seed)
    counts = torch.bincount(labels).double()
    quotas = counts * val_size / len(labels)
    per_class = quotas.floor().long()
    # Largest-remainder rounding so that the quotas add up to exactly val_size.
    leftover = val_size - int(per_class.sum())
    per_class[torch.argsort(quotas - per_class, descending=True, stable=True)[:leftover]] += 1
    shuffled = torch.randperm(len(labels), generator=generator)
    val_indices = torch.cat([shuffled[labels[shuffled] == c][:n] for c, n in enumerate(per_class.tolist())])
    is_val = torch.zeros(len(labels), dtype=torch.bool)
    is_val[val_indices] = True
    return torch.nonzero(~is_val).flatten(), torch.nonzero(is_val).flatten()


def random_crop(images: Tensor, padding: int) -> Tensor:
    """Crop each image of a batch at its own random offset after zero-padding (torchvision's RandomCrop)."""
    n, _, height, width = images.shape
    padded = F.pad(images, (padding,) * 4)
    top = torch.randint(0, 2 * padding + 1, (n, 1, 1, 1), device=images.device)
    left = torch.randint(0, 2 * padding + 1, (n, 1, 1, 1), device=images.device)
    rows = top + torch.arange(height, device=images.device).view(1, 1, height, 1)
    cols = left + torch.arange(width, device=images.device).view(1, 1, 1, width)
    batch = torch.arange(n, device=images.device).view(n, 1, 1, 1)
    channels = torch.arange(images.shape[1], device=images.device).view(1, -1, 1, 1)
    return padded[batch, channels, rows, cols]


def random_flip(images: Tensor) -> Tensor:
    """Flip each image of a batch horizontally with probability 0.5, independently."""
    flip = torch.rand(images.shape[0], 1, 1, 1, device=images.device) < 0.5
    return torch.where(flip, images.flip(-1), images)


def prepare_batch(images: Tensor, mean: Tensor, std: Tensor, augment: bool, image_size: int | None) -> Tensor:
    """uint8 (N, 3, H, W) -> normalised float, optionally augmented and resized to ``image_size``."""
    if augment:
        images = random_flip(random_crop(images, padding=4))
    batch = images.float().div_(255)
    if image_size is not None and batch.shape[-2:] != (image_size, image_size):
        downscale = image_size < min(batch.shape[-2:])
        batch = F.interpolate(
            batch, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=downscale
        )
    return (batch - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


# ---------------------------------------------------------------------------------------------


class CIFAR10DataModule(pl.LightningDataModule):
    """CIFAR-10 with a stratified validation split carved out of the training set.

    Reads ``data_dir/cifar-10-batches-py`` (torchvision's format, downloaded when ``download`` is
    true) or an image-folder tree ``data_dir/{train,test}/<class>/*.png`` (any classes: your own
    images work the same way).

    Args:
        data_dir: Folder holding ``cifar-10-batches-py/`` or ``train/`` and ``test/`` class folders.
        download: Download CIFAR-10 into ``data_dir`` if neither layout is there.
        batch_size: Images per batch (per device under DDP).
        num_workers: DataLoader worker processes; batches are cheap tensor slices, so 0 is usually fastest.
        val_size: Training images held out for validation (stratified). 0 validates on the test set,
            which only reproduces the reference recipe: a model picked on the test set has no honest
            test score.
        split_seed: Seed of the validation split; the same seed gives the same split.
        normalization: ``imagenet`` (suits pretrained weights), ``cifar10`` (its own statistics) or
            ``reference`` (mean = std = 0.5, as the published recipe).
        augment: Random crop (4-pixel zero padding) and horizontal flip of training batches.
        image_size: Resize batches to this square size (e.g. 64, 128, 224); ``None`` keeps 32.
        cache_dir: Where decoded image-folder arrays are cached; default ``$XDG_CACHE_HOME/transfer_lightning``.
    """

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = True,
        batch_size: int = 100,
        num_workers: int = 0,
        val_size: int = 5000,
        split_seed: int = 0,
        normalization: Normalization = "imagenet",
        augment: bool = False,
        image_size: int | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if batch_size < 1:
            raise UserInputError(f"batch_size must be at least 1, got {batch_size}.")
        if num_workers < 0:
            raise UserInputError(f"num_workers must be 0 or more, got {num_workers}.")
        if val_size < 0:
            raise UserInputError(f"val_size must be 0 or more, got {val_size}.")
        if image_size is not None and image_size < 1:
            raise UserInputError(f"image_size must be a positive number of pixels or null, got {image_size}.")
        if normalization not in NORMALIZATIONS:
            raise UserInputError(f"normalization must be one of {', '.join(NORMALIZATIONS)}, got {normalization!r}.")
        self.data_dir = Path(data_dir).expanduser()
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else _default_cache_dir()
        self.is_image_folder = (self.data_dir / "train").is_dir()
        self.class_names = self._find_class_names(download)
        mean, std = NORMALIZATIONS[normalization]
        self.mean, self.std = torch.tensor(mean), torch.tensor(std)
        self._stats_by_device: dict[torch.device, tuple[Tensor, Tensor]] = {}
        self.train_set: ImageTensorDataset | None = None
        self.val_set: ImageTensorDataset | None = None
        self.test_set: ImageTensorDataset | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_size(self) -> tuple[int, int] | None:
        """(height, width) of the batches the network gets; ``None`` before ``setup``."""
        if self.hparams.image_size is not None:
            return (self.hparams.image_size, self.hparams.image_size)
        return tuple(self.test_set.arrays.images.shape[-2:]) if self.test_set is not None else None

    def _find_class_names(self, download: bool) -> list[str]:
        if self.is_image_folder:
            return image_folder_classes(self.data_dir)
        if (self.data_dir / torchvision.datasets.CIFAR10.base_folder).is_dir() or download:
            return list(CIFAR10_CLASSES)
        raise UserInputError(
            f"No data in {self.data_dir}: expected either torchvision's CIFAR-10 folder "
            f"{self.data_dir / 'cifar-10-batches-py'} (set --data.download true to fetch it) or an image-folder "
            f"tree {self.data_dir}/train/<class>/*.png and {self.data_dir}/test/<class>/*.png. "
            "Point --data.data_dir at one of them."
        )

    def prepare_data(self) -> None:
        """Download CIFAR-10, or decode and cache the image folders (once per node)."""
        if self.is_image_folder:
            self._read_split("train")
            self._read_split("test")
        elif not (self.data_dir / torchvision.datasets.CIFAR10.base_folder).is_dir():
            download_cifar10(self.data_dir)

    def setup(self, stage: str) -> None:
        if self.train_set is not None:
            return
        pool, test = self._read_split("train"), self._read_split("test")
        if self.hparams.val_size == 0:
            rank_zero_info(
                "val_size is 0: validating on the TEST set (reference mode). "
                "Test accuracy is then not an honest estimate."
            )
            train, val = pool, test
        else:
            train_indices, val_indices = stratified_split(pool.labels, self.hparams.val_size, self.hparams.split_seed)
            train, val = pool.subset(train_indices), pool.subset(val_indices)
        self.train_set, self.val_set, self.test_set = map(ImageTensorDataset, (train, val, test))

    def _read_split(self, split: Literal["train", "test"]) -> ImageArrays:
        if self.is_image_folder:
            if not (self.data_dir / split).is_dir():
                raise UserInputError(
                    f"{self.data_dir / split} is missing: an image-folder tree needs train/ and test/ class folders."
                )
            return read_image_folder(self.data_dir / split, self.class_names, self.cache_dir)
        return read_cifar10_batches(self.data_dir, train=split == "train")

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)

    def _loader(self, dataset: ImageTensorDataset | None, shuffle: bool = False) -> DataLoader:
        on_gpu = self.trainer is not None and isinstance(self.trainer.accelerator, CUDAAccelerator)
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            sampler=self._sampler(dataset, shuffle),
            num_workers=self.hparams.num_workers,
            collate_fn=keep_batch,
            pin_memory=on_gpu,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def _sampler(self, dataset: ImageTensorDataset, shuffle: bool) -> Sampler | None:
        """Training order from (seed, epoch) alone; under DDP, evaluation sees each image exactly once.

        Lightning's default DistributedSampler pads the evaluation sets with repeated images so that
        every process gets as many; those repeats would count twice in val and test accuracy.
        """
        seed = torch.initial_seed()  # the run's seed_everything value (random without one)
        world_size = self.trainer.world_size if self.trainer is not None else 1
        if world_size == 1:
            return EpochShuffleSampler(len(dataset), seed) if shuffle else None
        rank = self.trainer.global_rank
        if shuffle:
            return DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        return UnrepeatedDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)

    def on_after_batch_transfer(self, batch: tuple[Tensor, Tensor], dataloader_idx: int) -> tuple[Tensor, Tensor]:
        """Normalise (and in training, augment) the uint8 batch on the device it now lives on."""
        images, labels = batch
        if images.dtype != torch.uint8:  # cached backbone features (features.py) arrive ready to use
            return batch
        training = self.trainer is not None and self.trainer.training
        return self.batch_transform(images, train=training), labels

    def batch_transform(self, images: Tensor, train: bool) -> Tensor:
        """uint8 images on any device -> the network's input; random augmentation only if ``train``."""
        if images.device not in self._stats_by_device:  # copy mean and std to a GPU once, not per batch
            self._stats_by_device[images.device] = (self.mean.to(images.device), self.std.to(images.device))
        mean, std = self._stats_by_device[images.device]
        return prepare_batch(
            images, mean, std, augment=self.hparams.augment and train, image_size=self.hparams.image_size
        )


def _default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "transfer_lightning"
