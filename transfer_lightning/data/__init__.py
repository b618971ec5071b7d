"""Image data: where it comes from, the decoded store, splits, and batch transforms.

- :mod:`~transfer_lightning.data.source`: what every source gives (class names, task, pools per split), and
  :mod:`~transfer_lightning.data.sources`: the factory that opens one from the data settings; the kinds:
  :mod:`~transfer_lightning.data.folders`, :mod:`~transfer_lightning.data.table_source` (over
  :mod:`~transfer_lightning.data.tables`), :mod:`~transfer_lightning.data.parquet`,
  :mod:`~transfer_lightning.data.cifar10`, :mod:`~transfer_lightning.data.streaming`;
- :mod:`~transfer_lightning.data.splits`: the split policy, written once;
- :mod:`~transfer_lightning.data.store`: decoding image files once into a memory-mapped store;
- :mod:`~transfer_lightning.data.datasets`: batches by indexing, class weights, the training order;
- :mod:`~transfer_lightning.data.transforms`: normalisation and augmentation of whole batches on the device;
- :mod:`~transfer_lightning.data.settings`: the data module's arguments checked;
- :mod:`~transfer_lightning.data.module`: the LightningDataModule that puts them together.
"""

from transfer_lightning.data.cifar10 import CIFAR10_CLASSES
from transfer_lightning.data.datasets import ImageArrays, ImageTensorDataset
from transfer_lightning.data.module import CIFAR10DataModule, ImageFolderDataModule
from transfer_lightning.data.source import Source
from transfer_lightning.data.sources import open_source
from transfer_lightning.data.splits import stratified_split
from transfer_lightning.data.store import ImageFolderStore, decode_image
from transfer_lightning.data.transforms import (
    NORMALIZATIONS,
    center_crop,
    prepare_batch,
    random_crop,
    random_flip,
    random_resized_crop,
)

__all__ = [
    "CIFAR10_CLASSES",
    "NORMALIZATIONS",
    "CIFAR10DataModule",
    "ImageArrays",
    "ImageFolderDataModule",
    "ImageFolderStore",
    "ImageTensorDataset",
    "Source",
    "center_crop",
    "decode_image",
    "prepare_batch",
    "random_crop",
    "random_flip",
    "open_source",
    "random_resized_crop",
    "stratified_split",
]
