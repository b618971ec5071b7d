"""Image tensors served a whole batch at a time, class weights, and the order of each loader."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler, Sampler


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
    :meth:`fingerprint`; empty for arrays made in memory. ``names`` names the image of each row of the arrays
    (its file), for findings about single images (``audit``).
    """

    def __init__(
        self,
        arrays: ImageArrays,
        indices: Tensor | None = None,
        source: str = "",
        names: list[str] | None = None,
    ) -> None:
        self.arrays = arrays
        self.indices = indices
        self.source = source
        self.names = names

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
        return ImageTensorDataset(self.arrays, self.rows(positions), self.source, self.names)

    def image_names(self) -> list[str]:
        """The name of each image, in order: its file, or ``row N`` of arrays without names."""
        rows = self.rows(torch.arange(len(self))).tolist()
        return [self.names[row] if self.names else f"row {row}" for row in rows]

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
