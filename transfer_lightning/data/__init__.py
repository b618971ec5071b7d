"""Image data: where it comes from, the decoded store, splits, and batch transforms.

- :mod:`~transfer_lightning.data.sources`: CIFAR-10's files and image-folder layouts;
- :mod:`~transfer_lightning.data.store`: decoding image folders once into a memory-mapped store;
- :mod:`~transfer_lightning.data.datasets`: splits as index sets, batches by indexing, the training order;
- :mod:`~transfer_lightning.data.transforms`: normalisation and augmentation of whole batches on the device;
- :mod:`~transfer_lightning.data.tables`, :mod:`~transfer_lightning.data.table_source`: label tables, and
  their rows joined with the image files;
- :mod:`~transfer_lightning.data.settings`: the data module's arguments checked, and the class names they imply;
- :mod:`~transfer_lightning.data.module`: the LightningDataModule that puts them together.
"""

from transfer_lightning.data.datasets import ImageArrays, ImageTensorDataset, stratified_split
from transfer_lightning.data.module import CIFAR10DataModule, ImageFolderDataModule
from transfer_lightning.data.sources import CIFAR10_CLASSES
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
    "center_crop",
    "decode_image",
    "prepare_batch",
    "random_crop",
    "random_flip",
    "random_resized_crop",
    "stratified_split",
]
