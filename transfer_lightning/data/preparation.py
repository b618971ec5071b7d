"""How batches are prepared for the network: the data's settings, with ``auto`` resolved from the backbone's weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from transfer_lightning.data.transforms import (
    DEFAULT_CROP_PCT,
    NORMALIZATIONS,
    Interpolation,
    Normalization,
    View,
    WeightsPreprocessing,
    prepare_batch,
)

#: ``auto``: the side the backbone's weights were trained at.
ImageSize = int | Literal["auto"] | None

#: What ``auto`` means when the data serves no model that knows its weights (a data module on its own):
#: ImageNet's statistics, torchvision's Resize(256) + CenterCrop(224), bilinear.
IMAGENET_WEIGHTS = WeightsPreprocessing(*NORMALIZATIONS["imagenet"], input_size=224)


@dataclass(frozen=True)
class Preparation:
    """The data's preparation settings after ``auto`` is resolved.

    Attributes:
        mean: Per-channel mean.
        std: Per-channel standard deviation.
        image_size: Side of the network's input, or ``None`` for the images' own size.
        crop_pct: Centre-crop side / stored side of resized images.
        interpolation: Resampling of the batches on the device.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int | None
    crop_pct: float = DEFAULT_CROP_PCT
    interpolation: Interpolation = "bilinear"

    @classmethod
    def resolve(
        cls, normalization: Normalization, image_size: ImageSize, weights: WeightsPreprocessing | None
    ) -> Preparation:
        """The settings ``normalization`` and ``image_size``, each ``auto`` taken from ``weights``
        (ImageNet's when ``None``); other normalizations keep 0.875 and bilinear, as before ``auto``."""
        weights = weights or IMAGENET_WEIGHTS
        size = weights.input_size if image_size == "auto" else image_size
        if normalization == "auto":
            return cls(tuple(weights.mean), tuple(weights.std), size, weights.crop_pct, weights.interpolation)
        mean, std = NORMALIZATIONS[normalization]
        return cls(mean, std, size)


class BatchPreparation:
    """Resolves the data's settings once (:meth:`resolved`) and turns uint8 batches on any device into the
    network's input, with each device's copy of mean and std."""

    def __init__(self, normalization: Normalization, image_size: ImageSize, crop_scale: tuple[float, float]) -> None:
        self.normalization, self.image_size, self.crop_scale = normalization, image_size, crop_scale
        self.preparation: Preparation | None = None
        self._stats: dict[tuple, tuple[Tensor, Tensor]] = {}

    def resolved(self, weights: WeightsPreprocessing | None) -> Preparation:
        """The settings with ``auto`` taken from ``weights``: from the first weights given on, always those
        (the store and the checkpoint depend on them); without weights yet, ImageNet's, not kept."""
        if self.preparation is not None:
            return self.preparation
        resolved = Preparation.resolve(self.normalization, self.image_size, weights)
        if weights is not None:
            self.preparation = resolved
        return resolved

    def __call__(self, images: Tensor, preparation: Preparation, augment: bool, view: View) -> Tensor:
        key = (images.device, preparation.mean, preparation.std)
        if key not in self._stats:  # copy mean and std to a GPU once, not per batch
            self._stats[key] = tuple(torch.tensor(v, device=images.device) for v in key[1:])
        mean, std = self._stats[key]
        return prepare_batch(
            images,
            mean,
            std,
            augment=augment,
            image_size=preparation.image_size,
            view=view,
            crop_scale=self.crop_scale,
            interpolation=preparation.interpolation,
        )
