"""Pictures of images for people: de-normalised batches, activation maps over images, titled contact
sheets, written as PNG files and into TensorBoard."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont
from tensorboard.compat.proto.summary_pb2 import Summary
from torch import Tensor
from torchvision.utils import make_grid

from transfer_lightning.files import atomic_path

#: Images per row of the training-batch grid.
BATCH_GRID_COLUMNS = 8
#: Smallest side of a picture in the sheets (smaller ones are enlarged), title font size, and the gap between.
MIN_TILE, TITLE_SIZE, GAP = 160, 12, 6


def denormalize(batch: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> Tensor:
    """The network's normalised input (N, 3, H, W) back to pixel values in [0, 1]."""
    mean, std = (torch.as_tensor(v, dtype=torch.float32, device=batch.device).view(1, -1, 1, 1) for v in (mean, std))
    return (batch.float() * std + mean).clamp(0, 1)


def overlay(image: Tensor, activation: Tensor, alpha: float = 0.5) -> Tensor:
    """An image (3, H, W) in [0, 1] blended with its activation map (H, W) in [0, 1] in the jet colours."""
    heat = torch.from_numpy(colormaps["jet"](activation.cpu().numpy())[..., :3]).permute(2, 0, 1).float()
    return (1 - alpha) * image.cpu() + alpha * heat


def explanation_picture(image: Tensor, activation: Tensor) -> Tensor:
    """uint8 (3, H, 2W): an image in [0, 1] as the network saw it, beside its activation map over it."""
    return to_uint8(torch.cat([image.cpu(), overlay(image, activation)], dim=2))


def png_bytes(image: Tensor) -> bytes:
    """A uint8 (3, H, W) image encoded as PNG."""
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(image: Tensor, path: Path) -> bytes:
    """Write a uint8 (3, H, W) image as a PNG, atomically; return its bytes."""
    encoded = png_bytes(image)
    with atomic_path(path) as partial:
        partial.write_bytes(encoded)
    return encoded


def to_uint8(images: Tensor) -> Tensor:
    """Pixel values in [0, 1] -> uint8, rounded to the nearest step (as a PNG stores them)."""
    return images.mul(255).round().clamp(0, 255).to(torch.uint8)


def batch_grid(batch: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> Tensor:
    """uint8 (3, H, W) grid of a normalised batch, de-normalised, :data:`BATCH_GRID_COLUMNS` per row."""
    return to_uint8(make_grid(denormalize(batch, mean, std).cpu(), nrow=BATCH_GRID_COLUMNS, padding=2))


def _font() -> ImageFont.ImageFont:
    """Pillow's own font at a readable size (a scalable one needs Pillow 10.1 and FreeType; else its bitmap one)."""
    try:
        return ImageFont.load_default(size=TITLE_SIZE)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def tile_sheet(tiles: list[tuple[Tensor, str]], columns: int) -> Tensor:
    """uint8 (3, H, W): images (3, h, w) in [0, 1], each under its title (lines split at "\\n"), ``columns``
    per row, small images enlarged (nearest neighbour) to at least :data:`MIN_TILE` pixels. Drawn with
    PIL: matplotlib's layout takes seconds for a few dozen titled images, this milliseconds."""
    height, width = tiles[0][0].shape[-2:]
    scale = max(1, math.ceil(MIN_TILE / max(height, width)))
    lines = max(title.count("\n") + 1 for _, title in tiles)
    title_height = lines * (TITLE_SIZE + 3) + 4
    cell_height, cell_width = height * scale + title_height, width * scale
    rows = math.ceil(len(tiles) / columns)
    sheet = Image.new("RGB", (columns * (cell_width + GAP) - GAP, rows * (cell_height + GAP) - GAP), "white")
    font = _font()
    for index, (image, title) in enumerate(tiles):
        top, left = divmod(index, columns)
        top, left = top * (cell_height + GAP), left * (cell_width + GAP)
        pixels = to_uint8(image.cpu()).repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
        sheet.paste(Image.fromarray(pixels.permute(1, 2, 0).numpy()), (left, top + title_height))
        cell = Image.new("RGB", (cell_width, title_height), "white")  # the title clipped to its own cell
        ImageDraw.Draw(cell).multiline_text((2, 2), title, fill="black", font=font, spacing=3)
        sheet.paste(cell, (left, top))
    return torch.from_numpy(np.asarray(sheet).copy()).permute(2, 0, 1)


def save_sheet(sheet: Tensor, path: Path, logger: object = None, tag: str = "", step: int = 0) -> None:
    """Write a uint8 (3, H, W) picture as a PNG and, given a TensorBoard logger, as its image ``tag``
    (the same PNG bytes: TensorBoard's ``add_image`` would encode it again)."""
    encoded = save_png(sheet, path)
    if isinstance(logger, TensorBoardLogger):
        image = Summary.Image(height=sheet.shape[1], width=sheet.shape[2], colorspace=3, encoded_image_string=encoded)
        logger.experiment._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
