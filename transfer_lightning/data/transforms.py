"""Batch transforms: uint8 images on the training device -> the network's normalised input.

Every transform works on a whole batch at once, with per-image randomness, so no image passes
through Python or PIL per epoch (the idea of KellerJordan/cifar10-airbench and ffcv).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

#: Per-channel (mean, std) presets. ``reference`` is the published recipe's mean = std = 0.5.
NORMALIZATIONS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "reference": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
#: ``auto`` takes the mean and std (and the crop fraction and interpolation) of the backbone's weights.
Normalization = Literal["auto", "imagenet", "cifar10", "reference"]
#: How images are resampled on the device: the weights' own (timm's ``interpolation``, torchvision's transforms).
Interpolation = Literal["bilinear", "bicubic"]

#: How a stored image becomes the network's input (see :func:`prepare_batch`).
View = Literal["resize", "crop"]

#: Input side / stored side for images resized at decode time: torchvision's Resize(256) + CenterCrop(224),
#: and timm's default ``crop_pct``. With ``normalization: auto`` the weights' own crop fraction is used.
DEFAULT_CROP_PCT = 224 / 256


@dataclass(frozen=True)
class WeightsPreprocessing:
    """What a backbone's pretrained weights expect of their input, from the weights' own metadata
    (timm's ``resolve_model_data_config``, torchvision's ``weights.transforms()``).

    Attributes:
        mean: Per-channel mean subtracted from pixels in [0, 1].
        std: Per-channel standard deviation they are divided by.
        input_size: Side of the square the weights were trained at.
        crop_pct: Centre-crop side / resized side at evaluation (0.875: Resize(256) + CenterCrop(224)).
        interpolation: Resampling of the weights' transforms.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: int
    crop_pct: float = DEFAULT_CROP_PCT
    interpolation: Interpolation = "bilinear"


def stored_size(image_size: int, crop_pct: float = DEFAULT_CROP_PCT) -> int:
    """Side of the square an image is stored at, so that ``image_size`` is its centre crop (224 -> 256)."""
    return round(image_size / crop_pct)


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


def random_resized_crop(
    images: Tensor,
    size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    interpolation: Interpolation = "bilinear",
) -> Tensor:
    """torchvision's ``RandomResizedCrop(size, scale, ratio)`` + ``RandomHorizontalFlip`` for a float batch.

    Each image gets its own box (area a uniform fraction ``scale`` of the image, aspect ratio
    log-uniform in ``ratio``) and flip, and all boxes are resampled (``interpolation``) to ``size`` in one
    ``grid_sample`` call. Where torchvision retries a box that does not fit ten times, this clips
    its sides to the image instead, which keeps the whole batch one tensor operation.
    """
    n, _, height, width = images.shape
    device = images.device
    area = height * width * torch.empty(n, device=device).uniform_(*scale)
    aspect = torch.exp(torch.empty(n, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1])))
    box_w = torch.sqrt(area * aspect).clamp(max=width)
    box_h = torch.sqrt(area / aspect).clamp(max=height)
    centre_x = box_w / 2 + torch.rand(n, device=device) * (width - box_w)
    centre_y = box_h / 2 + torch.rand(n, device=device) * (height - box_h)
    flip = torch.where(torch.rand(n, device=device) < 0.5, -1.0, 1.0)
    # affine_grid maps output coordinates in [-1, 1] to input coordinates in [-1, 1].
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0] = flip * box_w / width
    theta[:, 0, 2] = 2 * centre_x / width - 1
    theta[:, 1, 1] = box_h / height
    theta[:, 1, 2] = 2 * centre_y / height - 1
    grid = F.affine_grid(theta.to(images.dtype), [n, images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode=interpolation, padding_mode="border", align_corners=False)


def center_crop(images: Tensor, size: int) -> Tensor:
    """The central ``size`` x ``size`` square of every image of a batch (torchvision's CenterCrop)."""
    height, width = images.shape[-2:]
    top, left = (height - size) // 2, (width - size) // 2
    return images[..., top : top + size, left : left + size]


def prepare_batch(
    images: Tensor,
    mean: Tensor,
    std: Tensor,
    augment: bool,
    image_size: int | None,
    view: View = "resize",
    crop_scale: tuple[float, float] = (0.08, 1.0),
    interpolation: Interpolation = "bilinear",
) -> Tensor:
    """uint8 (N, 3, H, W) -> normalised float (N, 3, image_size, image_size), augmented if ``augment``.

    ``view="resize"`` serves images stored at their own size (CIFAR-10's 32 px): augmentation is a
    4-pixel padded random crop and a flip, then the whole image is resized to ``image_size``.
    ``view="crop"`` serves images stored at :func:`stored_size` of ``image_size``: augmentation is a
    random resized crop (``crop_scale``) and a flip, otherwise the centre ``image_size`` square.
    """
    if view == "crop" and image_size is not None:
        if augment:
            batch = random_resized_crop(images.float().div_(255), image_size, crop_scale, interpolation=interpolation)
        else:
            batch = center_crop(images, image_size).float().div_(255)
    else:
        if augment:
            images = random_flip(random_crop(images, padding=4))
        batch = images.float().div_(255)
        if image_size is not None and batch.shape[-2:] != (image_size, image_size):
            downscale = image_size < min(batch.shape[-2:])
            batch = F.interpolate(
                batch, size=(image_size, image_size), mode=interpolation, align_corners=False, antialias=downscale
            )
    return (batch - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


#: How an image file is decoded into a store: :func:`~transfer_lightning.data.store.decode_image`'s size (H, W),
#: interpolation and centre square.
Decoding = tuple[tuple[int, int], Interpolation, int | None]

#: The version of :class:`Preprocessing`'s saved form. 2: ``resize`` says how stored images were resized. 1 (older
#: checkpoints): it is absent, and they were resized bilinear whatever ``interpolation`` said.
PREPROCESSING_FORMAT = 2


@dataclass(frozen=True)
class Preprocessing:
    """How an image file becomes the network's input at evaluation, exactly as in training.

    1. Decode (RGB, EXIF-upright), resize (``resize``, antialiased) keeping the aspect ratio until ``stored_size``
       (H, W) is covered, and take the centre ``stored_size`` (:func:`~transfer_lightning.data.store.decode_image`).
    2. :func:`prepare_batch` without augmentation: the centre ``image_size`` square (``view`` crop)
       or a resize of the whole image to ``image_size`` (``view`` resize), then ``mean`` and ``std``.

    Saved in every checkpoint, so that ``predict`` and ``export`` need neither a config nor the training data.
    """

    stored_size: tuple[int, int]
    view: View
    image_size: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: Interpolation = "bilinear"
    resize: Interpolation = "bilinear"
    format: int = PREPROCESSING_FORMAT

    @property
    def decoding(self) -> Decoding:
        """How step 1 decodes: the stored size, the resize, and the centre square that evaluation crops."""
        return tuple(self.stored_size), self.resize, self.image_size if self.view == "crop" else None

    @property
    def caller_size(self) -> tuple[int, int]:
        """(H, W) of the uint8 images an exported model takes: what step 1 gives, centre-cropped in crop view."""
        if self.view == "crop" and self.image_size is not None:
            return (self.image_size, self.image_size)
        return tuple(self.stored_size)

    def __call__(self, images: Tensor) -> Tensor:
        """uint8 (N, 3, H, W) images from step 1 (or of :attr:`caller_size`) -> the network's input."""
        mean = torch.tensor(self.mean, device=images.device)
        std = torch.tensor(self.std, device=images.device)
        return prepare_batch(
            images,
            mean,
            std,
            augment=False,
            image_size=self.image_size,
            view=self.view,
            interpolation=self.interpolation,
        )

    def describe(self) -> str:
        """Step 1 for a caller of an exported model, in words."""
        height, width = self.caller_size
        upright = "Turn each image upright by its EXIF orientation (PIL.ImageOps.exif_transpose), convert it to RGB, "
        if tuple(self.stored_size) == (height, width):
            return upright + (
                f"resize it keeping its aspect ratio so that it covers {height}x{width} ({self.resize}, "
                f"antialiased, as PIL's resize), then take the centre {height}x{width}; uint8, channels first."
            )
        return upright + (
            f"resize it keeping its aspect ratio so that it covers {self.stored_size[0]}x"
            f"{self.stored_size[1]} ({self.resize}, antialiased, as PIL's resize; torchvision's "
            f"Resize({min(self.stored_size)}) for a square), then take the centre {height}x{width} "
            f"(CenterCrop({height})); uint8, channels first."
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Preprocessing:
        return cls(
            stored_size=tuple(values["stored_size"]),
            view=values["view"],
            image_size=values["image_size"],
            mean=tuple(values["mean"]),
            std=tuple(values["std"]),
            interpolation=values.get("interpolation", "bilinear"),  # older checkpoints name none: bilinear
            resize=values.get("resize", "bilinear"),  # format 1: stored images were resized bilinear
            format=values.get("format", 1),
        )
