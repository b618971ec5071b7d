"""The split policy, written once: a data set's train, val and test pools become the run's three splits.

Every source (folders, a label table, Parquet, CIFAR-10) and ``optimize`` go through :func:`make_splits`, so a
photo folder trained from directly and the same folder streamed after ``optimize`` have the same splits.
"""

from __future__ import annotations

from typing import Generic, NamedTuple, Protocol, TypeVar

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from transfer_lightning.errors import UserInputError


class Pool(Protocol):
    """What a pool of images needs for splitting: its size, its labels, and a subset by positions."""

    def __len__(self) -> int: ...

    @property
    def labels(self) -> Tensor: ...

    def subset(self, positions: Tensor) -> Pool: ...


P = TypeVar("P", bound=Pool)


class Pools(NamedTuple, Generic[P]):
    """The train, val and test pools a data set has (``None`` where it has none), and how the log names each."""

    train: P
    val: P | None
    test: P | None
    names: tuple[str, str | None, str | None]
    #: What the data lacks when val also tests ("no test folder", "no test rows").
    no_test: str = "no test folder"


class Splits(NamedTuple, Generic[P]):
    """The train, val and test sets of a run, one line saying where each comes from, and which one stands in for
    another (``val_is_test``: ``val_size`` 0; ``test_is_val``: the data has no test pool)."""

    train: P
    val: P
    test: P
    description: str
    val_is_test: bool = False
    test_is_val: bool = False


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


def make_splits(pools: Pools[P], val_size: int | float, split_seed: int, root: object) -> Splits[P]:
    """(train, val, test) from the pools a data set has: val carved out of train (stratified, seeded)
    where there is no val pool (or the test set with ``val_size`` 0, the reference's way), and test
    served by val where there is no test pool. ``root`` names the data set in messages."""
    (train, val, test), (train_name, val_name, test_name) = pools[:3], pools.names
    val_is_test = test_is_val = False
    if val is None:
        count = validation_count(val_size, len(train), train_name)
        if count == 0:
            if test is None:
                raise UserInputError(f"val_size 0 validates on the test set, but {root} has {pools.no_test}.")
            rank_zero_info(
                "val_size is 0: validating on the TEST set (reference mode). Test accuracy is then not honest."
            )
            val, val_name, val_is_test = test, test_name, True
        else:
            train_positions, val_positions = stratified_split(train.labels, count, split_seed)
            train, val = train.subset(train_positions), train.subset(val_positions)
            how = "iterative stratification" if train.labels.ndim == 2 else "stratified"
            val_name = f"{len(val_positions)} images held out of {train_name} ({how}, seed {split_seed})"
    if test is None:
        test, test_name, test_is_val = val, f"the val images ({pools.no_test} in {root})", True
    description = (
        f"train = {train_name} ({len(train)} images), val = {val_name} ({len(val)} images), "
        f"test = {test_name} ({len(test)} images)"
    )
    return Splits(train, val, test, description, val_is_test, test_is_val)


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
