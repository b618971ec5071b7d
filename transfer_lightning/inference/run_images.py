"""A trained run's own images after training: its splits as the checkpoint's data settings make them, at the size an
exported file takes. ``export --quantize`` calibrates on the training split and checks on the validation split."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from transfer_lightning import checkpoints
from transfer_lightning.data import ImageFolderDataModule, ImageTensorDataset, center_crop
from transfer_lightning.data.transforms import DEFAULT_CROP_PCT, Preprocessing, WeightsPreprocessing
from transfer_lightning.errors import UserInputError


@dataclass
class RunImages:
    """The splits of a run, served as uint8 batches at :attr:`Preprocessing.caller_size`."""

    train: ImageTensorDataset
    val: ImageTensorDataset
    preprocessing: Preprocessing
    test: ImageTensorDataset | None = None

    def batches(self, dataset: ImageTensorDataset, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """(images, labels) of ``dataset`` in order, the images as an exported file takes them."""
        for images, labels in dataset.batches(batch_size):
            yield self.for_caller(images), labels

    def for_caller(self, images: Tensor) -> Tensor:
        """Stored images -> what an exported file takes: the centre square in crop view, else the images as stored."""
        if self.preprocessing.view == "crop" and self.preprocessing.image_size is not None:
            return center_crop(images, self.preprocessing.image_size)
        return images

    def sample_train(self, count: int, seed: int = 0) -> Tensor:
        """``count`` training images drawn without replacement (seeded), as an exported file takes them."""
        positions = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(seed))[:count]
        return self.for_caller(self.train.subset(positions.sort().values).to_arrays().images)


def open_run_images(checkpoint: dict[str, Any], preprocessing: Preprocessing, **overrides: Any) -> RunImages:
    """The splits of the data the checkpoint was trained on (its saved data settings, changed by ``overrides``,
    e.g. a moved ``data_dir``), checked to come out at the checkpoint's stored size."""
    saved = checkpoint.get("datamodule_hyper_parameters", {})
    settings = {key: value for key, value in saved.items() if not key.startswith("_")}  # LightningCLI's own keys
    settings |= {key: value for key, value in overrides.items() if value is not None}
    if settings.get("streaming_dir"):
        raise UserInputError(
            "int8 calibration reads the run's images from a folder, a label table, Parquet or CIFAR-10, not from a "
            "stream: pass --data.data_dir (or --data.labels_file) of the images the stream was optimized from."
        )
    settings |= {"download": False, "predict_dir": None, "class_names": checkpoints.class_names(checkpoint)}
    data = ImageFolderDataModule(**settings)
    # ``auto`` as the run resolved it: the checkpoint's preprocessing, told as the weights' own.
    side = preprocessing.image_size or preprocessing.stored_size[0]
    crop_pct = side / preprocessing.stored_size[0] if preprocessing.view == "crop" else DEFAULT_CROP_PCT
    data.use_weights(
        WeightsPreprocessing(preprocessing.mean, preprocessing.std, side, crop_pct, preprocessing.interpolation)
    )
    data.prepare_data()
    data.setup("fit")
    found = data.preprocessing
    same_size = (tuple(found.stored_size), found.view) == (tuple(preprocessing.stored_size), preprocessing.view)
    if not same_size or (found.view == "crop" and found.resize != preprocessing.resize):  # else nothing was resized
        raise UserInputError(
            f"The data ({data.source.describe()}) comes out at {found.stored_size} ({found.view}, resized "
            f"{found.resize}), but "
            f"the checkpoint was trained on {preprocessing.stored_size} ({preprocessing.view}, resized "
            f"{preprocessing.resize}): pass the run's own --data.data_dir, or train again with this version."
        )
    return RunImages(data.train_set, data.val_set, preprocessing, data.test_set)
