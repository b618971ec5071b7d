"""What every source of a run's images gives, whatever it reads: class names, the task, a one-line description, and
its pools of images per split (:class:`LocalSource`), or splits made once already (a stream).

The kinds, one class each: class folders (:mod:`~transfer_lightning.data.folders`), a label table
(:mod:`~transfer_lightning.data.table_source`), Parquet (:mod:`~transfer_lightning.data.parquet`), CIFAR-10's own
batches (:mod:`~transfer_lightning.data.cifar10`) and an optimized stream (:mod:`~transfer_lightning.data.streaming`);
:func:`~transfer_lightning.data.sources.open_source` picks one from the data settings. A source is usable without a
DataModule: ``optimize`` reads its sample pools directly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor

from transfer_lightning.data.datasets import ImageTensorDataset, balancing_weights, positive_weights
from transfer_lightning.data.splits import Pools, Splits, validation_count
from transfer_lightning.data.store import ImageFolderStore, shared_store_size
from transfer_lightning.data.transforms import Decoding, Interpolation, View
from transfer_lightning.tasks import TaskName

#: An image's source (a file's path, or its encoded bytes) and its label (a class index, or one 0/1 per class).
Sample = tuple[str | bytes, int | tuple[int, ...]]


class Samples(list):
    """The samples of one pool, in order, with the folder their paths are relative to and the name of their store;
    a pool as :func:`~transfer_lightning.data.splits.make_splits` splits it."""

    def __init__(self, samples: Iterable[Sample], folder: Path, store_name: str | None = None) -> None:
        super().__init__(samples)
        self.folder, self.store_name = folder, store_name

    @property
    def labels(self) -> Tensor:
        return torch.tensor([label for _, label in self], dtype=torch.int64)

    def subset(self, positions: Tensor) -> Samples:
        return Samples((self[i] for i in positions.tolist()), self.folder, self.store_name)


class Source(ABC):
    """Where a run's images come from."""

    #: The class names, in label order.
    class_names: list[str]

    @property
    @abstractmethod
    def task(self) -> TaskName:
        """multilabel when images have several labels (or 0/1 columns), else multiclass."""

    @abstractmethod
    def describe(self) -> str:
        """One line: what kind of source, and where."""

    @abstractmethod
    def stored_size(self, image_size: int | None, crop_pct: float) -> tuple[tuple[int, int], View]:
        """The (H, W) the images are kept at for a network input of ``image_size``, and the view that needs."""

    @abstractmethod
    def prepare(self, decoding: Decoding, val_size: int | float) -> None:
        """Once per node, before the run's folder exists: fetch or decode what is read later, and check that
        ``val_size`` leaves images to train on."""

    def stored_interpolation(self, wanted: Interpolation) -> Interpolation:
        """How the stored images are resized: as the run wants, unless they were stored already."""
        return wanted

    def loss_weights(self, train_set: ImageTensorDataset) -> Tensor:
        """Class weights that make every class weigh the same in the training loss (``class_balance: loss``)."""
        labels = train_set.labels
        return (
            positive_weights(labels) if self.task == "multilabel" else balancing_weights(labels, len(self.class_names))
        )


class LocalSource(Source):
    """A source decoded into tensors on this machine, whose pools are split here by the one split policy."""

    #: Names the data set in messages.
    root: Path

    @property
    def names_root(self) -> Path:
        """The folder an image's file is named relative to in findings about it: the data's folder."""
        return self.root

    @abstractmethod
    def pools(self, decoding: Decoding) -> Pools[ImageTensorDataset]:
        """The train, val and test pools, decoded as ``decoding`` says."""

    def summary(self, splits: Splits[ImageTensorDataset]) -> str | None:
        """A log line on the splits beyond the usual one, or ``None``."""
        return None


class FileSource(LocalSource):
    """Image files, listed in :meth:`sample_pools` and decoded once into a memory-mapped store per pool."""

    def __init__(self, cache_dir: Path, skip_bad_images: bool) -> None:
        self.cache_dir, self.skip_bad_images = cache_dir, skip_bad_images
        self._stores: list[ImageFolderStore | None] | None = None

    @abstractmethod
    def sample_pools(self) -> Pools[Samples]:
        """The samples of the train, val and test pools, as listed (nothing decoded)."""

    def stores(self) -> list[ImageFolderStore | None]:
        """The store of each pool (``None`` where there is no pool), listed once."""
        if self._stores is None:
            self._stores = [
                ImageFolderStore(pool.folder, None, self.cache_dir, self.skip_bad_images, pool, pool.store_name)
                if pool is not None
                else None
                for pool in self.sample_pools()[:3]
            ]
        return self._stores

    def stored_size(self, image_size: int | None, crop_pct: float) -> tuple[tuple[int, int], View]:
        return shared_store_size([store for store in self.stores() if store], image_size, self.root, crop_pct)

    def prepare(self, decoding: Decoding, val_size: int | float) -> None:
        for store in filter(None, self.stores()):
            store.build(*decoding)
        pools = self.sample_pools()
        if pools.val is None:
            validation_count(val_size, len(pools.train), pools.names[0])

    def pools(self, decoding: Decoding) -> Pools[ImageTensorDataset]:
        listed = self.sample_pools()
        decoded = [store.dataset(*decoding) if store else None for store in self.stores()]
        return Pools(*decoded, names=listed.names, no_test=listed.no_test)
