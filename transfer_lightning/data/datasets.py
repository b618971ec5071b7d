"""Splits as index sets over uint8 image tensors, batches by indexing, and the order of each loader."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler, Sampler

from transfer_lightning.errors import UserInputError


class ImageArrays(NamedTuple):
    """Images and labels of a source: ``images`` uint8 (N, 3, H, W) in memory or memory-mapped, ``labels``
    class indices (N,), or for multi-label 0/1 (N, classes)."""

    images: Tensor
    labels: Tensor


class ImageTensorDataset(Dataset):
    """The rows ``indices`` of :class:`ImageArrays` (all rows when ``None``), served a whole batch at a time.

    A batch is one indexing operation (``__getitems__``), not a Python call per image. Over a
    memory-mapped store only the rows of the batch are read, so a split larger than memory works.
    ``source`` names where the arrays came from (a store folder, CIFAR-10's files), for
    :meth:`fingerprint`; empty for arrays made in memory.
    """

    def __init__(self, arrays: ImageArrays, indices: Tensor | None = None, source: str = "") -> None:
        self.arrays = arrays
        self.indices = indices
        self.source = source

    def fingerprint(self) -> str | None:
        """A hash of which images these are (source and rows); ``None`` when the source is unnamed."""
        if not self.source:
            return None
        digest = hashlib.sha256(self.source.encode())
        rows = self.indices if self.indices is not None else torch.arange(len(self.arrays.labels))
        digest.update(rows.to(torch.int64).numpy().tobytes())
        return digest.hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.arrays.labels) if self.indices is None else len(self.indices)

    def rows(self, positions: Tensor) -> Tensor:
        return positions if self.indices is None else self.indices[positions]

    @property
    def labels(self) -> Tensor:
        return self.arrays.labels if self.indices is None else self.arrays.labels[self.indices]

    def __getitem__(self, position: int) -> tuple[Tensor, Tensor]:
        row = int(self.rows(torch.tensor(position)))
        return self.arrays.images[row], self.arrays.labels[row]

    def __getitems__(self, positions: list[int]) -> tuple[Tensor, Tensor]:
        rows = self.rows(torch.as_tensor(positions))
        return self.arrays.images[rows], self.arrays.labels[rows]

    def subset(self, positions: Tensor) -> ImageTensorDataset:
        """The images at ``positions`` of this dataset, without copying any."""
        return ImageTensorDataset(self.arrays, self.rows(positions), self.source)

    def batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """(images, labels) of consecutive positions, ``batch_size`` at a time."""
        for start in range(0, len(self), batch_size):
            yield self.__getitems__(list(range(start, min(start + batch_size, len(self)))))

    def to_arrays(self) -> ImageArrays:
        """All images of this dataset in memory (for small sets, the reference loop and tests)."""
        return ImageArrays(*self.__getitems__(list(range(len(self)))))


def keep_batch(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Collate function for :class:`ImageTensorDataset`: its ``__getitems__`` already built the batch."""
    return batch


class EpochSampler(DistributedSampler):
    """A training order that depends only on (seed, epoch), so a resumed run sees the same batches.

    ``RandomSampler`` draws from the global random state, which a checkpoint does not restore;
    Lightning calls :meth:`set_epoch` at the start of every epoch. With ``weights`` it draws
    ``size`` images with replacement, image ``i`` in proportion to ``weights[i]`` (what
    ``WeightedRandomSampler`` does). Under DDP each of ``world_size`` processes takes every
    ``world_size``-th image of the order, padded to equal shares as ``DistributedSampler`` does.
    It is a ``DistributedSampler`` so that Lightning uses it as it is under DDP: any other sampler
    Lightning wraps in a ``DistributedSamplerWrapper``, which gave each process half of its half.
    """

    def __init__(self, size: int, seed: int, weights: Tensor | None = None, rank: int = 0, world_size: int = 1) -> None:
        super().__init__(range(size), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        self.size, self.weights, self.world_size = size, weights, world_size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.weights is None:
            order = torch.randperm(self.size, generator=generator)
        else:
            order = torch.multinomial(self.weights, self.size, replacement=True, generator=generator)
        if self.world_size > 1:
            order = torch.cat([order, order[: len(self) * self.world_size - self.size]])[self.rank :: self.world_size]
        return iter(order.tolist())

    def __len__(self) -> int:
        return math.ceil(self.size / self.world_size)


def balancing_weights(labels: Tensor, num_classes: int) -> Tensor:
    """Per-class weights ``N / (classes x count)``: every class weighs the same in total (sklearn's "balanced")."""
    return count_balancing_weights(torch.bincount(labels, minlength=num_classes), len(labels))


def count_balancing_weights(counts: Tensor, total: int) -> Tensor:
    """:func:`balancing_weights` from the images per class and their total."""
    return (total / (len(counts) * counts.double().clamp(min=1))).float()


def positive_weights(labels: Tensor) -> Tensor:
    """``BCEWithLogitsLoss``'s ``pos_weight`` for 0/1 labels (N, classes): negatives / positives per class,
    so that a class's positives weigh as much as its negatives (1 for a class without positives)."""
    return count_positive_weights(labels.sum(dim=0), len(labels))


def count_positive_weights(positives: Tensor, total: int) -> Tensor:
    """:func:`positive_weights` from the images that have each class and their total."""
    positives = positives.double()
    return torch.where(positives > 0, (total - positives) / positives.clamp(min=1), 1.0).float()


def class_counts(labels: Tensor, num_classes: int) -> list[int]:
    """Images per class: of each class index, or for 0/1 labels (N, classes) the images that have each class."""
    if labels.ndim == 2:
        return labels.sum(dim=0).tolist()
    return torch.bincount(labels, minlength=num_classes).tolist()


def validation_count(val_size: int | float, pool_size: int, pool_name: str = "the training set") -> int:
    """``val_size`` as a number of images held out of a pool: a count, or a fraction (0 < f < 1) of it.

    Raises :class:`UserInputError`, saying what to set, when it would leave no image to train on.
    """
    if isinstance(val_size, float) and 0 < val_size < 1:
        count = max(1, round(val_size * pool_size))
    elif isinstance(val_size, float) and not val_size.is_integer():
        raise UserInputError(f"val_size must be a count of images or a fraction between 0 and 1, got {val_size}.")
    else:
        count = int(val_size)
    if count >= pool_size:
        raise UserInputError(
            f"data.val_size {val_size} holds out {count} images for validation, but {pool_name} has {pool_size}: "
            f"set --data.val_size to a fraction such as 0.2, or a count below {pool_size}."
        )
    return count


class Splits(NamedTuple):
    """The train, val and test sets of a run, and one line saying where each comes from."""

    train: ImageTensorDataset
    val: ImageTensorDataset
    test: ImageTensorDataset
    description: str


def make_splits(
    pools: tuple[ImageTensorDataset, ImageTensorDataset | None, ImageTensorDataset | None],
    names: tuple[str, str | None, str | None],
    val_size: int | float,
    split_seed: int,
    root: Path,
    no_test: str = "no test folder",
) -> Splits:
    """(train, val, test) from the pools a data set has: val carved out of train (stratified, seeded)
    where there is no val pool (or the test set with ``val_size`` 0, the reference's way), and test
    served by val where there is no test pool. ``root`` names the data set in messages, ``no_test``
    says what it lacks when val also tests."""
    (train, val, test), (train_name, val_name, test_name) = pools, names
    if val is None:
        count = validation_count(val_size, len(train), train_name)
        if count == 0:
            if test is None:
                raise UserInputError(f"val_size 0 validates on the test set, but {root} has {no_test}.")
            rank_zero_info(
                "val_size is 0: validating on the TEST set (reference mode). Test accuracy is then not honest."
            )
            val, val_name = test, test_name
        else:
            train_positions, val_positions = stratified_split(train.labels, count, split_seed)
            train, val = train.subset(train_positions), train.subset(val_positions)
            how = "iterative stratification" if train.labels.ndim == 2 else "stratified"
            val_name = f"{len(val_positions)} images held out of {train_name} ({how}, seed {split_seed})"
    if test is None:
        test, test_name = val, f"the val images ({no_test} in {root})"
    description = (
        f"train = {train_name} ({len(train)} images), val = {val_name} ({len(val)} images), "
        f"test = {test_name} ({len(test)} images)"
    )
    return Splits(train, val, test, description)


def make_sampler(
    dataset: ImageTensorDataset, shuffle: bool, balance_classes: int | None, rank: int, world_size: int
) -> Sampler | None:
    """The order a loader serves ``dataset`` in: for training (``shuffle``) an :class:`EpochSampler`,
    drawing classes evenly when ``balance_classes`` gives their number; for evaluation, under DDP,
    Lightning's ``UnrepeatedDistributedSampler``, which shows each image to exactly one process
    (the default DistributedSampler pads with repeated images, which would count twice in accuracy)."""
    if shuffle:
        weights = balancing_weights(dataset.labels, balance_classes)[dataset.labels] if balance_classes else None
        seed = torch.initial_seed()  # the run's seed_everything value (random without one)
        return EpochSampler(len(dataset), seed, weights=weights, rank=rank, world_size=world_size)
    if world_size == 1:
        return None
    return UnrepeatedDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)


def stratified_split(labels: Tensor, val_size: int, seed: int) -> tuple[Tensor, Tensor]:
    """Split positions of ``labels`` into (train, val), ``val_size`` of them for val, per-class proportional.

    The same ``seed`` gives the same split on every machine. Both index tensors are sorted. 0/1
    labels (N, classes) of multi-label data go to :func:`iterative_stratified_split`.
    """
    if not 0 < val_size < len(labels):
        raise UserInputError(
            f"val_size must be between 1 and {len(labels) - 1} (the training set has {len(labels)} images), "
            f"got {val_size}."
        )
    if labels.ndim == 2:
        return iterative_stratified_split(labels, val_size, seed)
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


def iterative_stratified_split(labels: Tensor, val_size: int, seed: int) -> tuple[Tensor, Tensor]:
    """(train, val) positions of multi-label 0/1 ``labels`` (N, classes), about ``val_size`` for val.

    Iterative stratification (Sechidis, Tsoumakas and Vlahavas, 2011), which scikit-multilearn and
    iterstrat implement: the rarest class still unplaced goes first, each of its images to the split
    that most lacks that class, so rare classes are spread before common ones fill the splits. A
    simple random split of multi-label data leaves rare classes out of validation; here every class
    with at least two images wants one of them in validation (a class with one image can only train,
    and the setup log says so). Images without labels fill the splits' remaining room. The sizes are
    within a few images of the request; the same ``seed`` gives the same split.
    """
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator).numpy()
    present = labels.numpy()[order] > 0
    counts = present.sum(axis=0).astype(float)
    want_val = counts * val_size / len(labels)
    want_val = np.where(counts >= 2, np.maximum(want_val, 1.0), want_val)
    wanted = np.stack([counts - want_val, want_val])  # images of each class that (train, val) still want
    room = np.array([len(labels) - val_size, val_size], dtype=float)  # images each split still wants
    split = np.full(len(labels), -1)
    remaining = present.copy()  # labels of the images not placed yet
    while remaining.any():
        left = remaining.sum(axis=0)
        rarest = int(np.argmin(np.where(left > 0, left, np.inf)))
        for image in np.flatnonzero(remaining[:, rarest]):
            target = 1 if (wanted[1, rarest], room[1]) > (wanted[0, rarest], room[0]) else 0
            split[image] = target
            wanted[target] -= present[image]
            room[target] -= 1
            remaining[image] = False
    for image in np.flatnonzero(split < 0):  # no label at all
        split[image] = int(room[1] > room[0])
        room[split[image]] -= 1
    is_val = np.zeros(len(labels), dtype=bool)
    is_val[order[split == 1]] = True
    return torch.from_numpy(np.flatnonzero(~is_val)), torch.from_numpy(np.flatnonzero(is_val))
