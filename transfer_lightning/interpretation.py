"""Where a trained classifier fails and where it looks, as pictures in the run folder and TensorBoard.

After ``test``: the test images with the highest loss (often wrongly labelled ones) and examples of
the most confused class pairs, each as the network saw it (the centre view, de-normalised), with
Grad-CAM maps (:mod:`~transfer_lightning.cam`) for the predicted and the true class. At the start of
``fit``: the first training batch after the device transforms, so a user sees what random resized
crop and flip do to their photos. The pictures are what fastai's ``plot_top_losses`` and
``most_confused`` and Ultralytics' ``train_batch.jpg`` show.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont
from tensorboard.compat.proto.summary_pb2 import Summary
from torch import Tensor
from torchmetrics.aggregation import CatMetric
from torchvision.utils import make_grid

from transfer_lightning.cam import grad_cam, resolve_cam_layer
from transfer_lightning.data import ImageTensorDataset
from transfer_lightning.errors import UserInputError
from transfer_lightning.files import atomic_path

#: Images per row of the training-batch grid.
BATCH_GRID_COLUMNS = 8
#: Smallest side of a picture in the sheets (smaller ones are enlarged), title font size, and the gap between.
MIN_TILE, TITLE_SIZE, GAP = 160, 12, 6


@dataclass(frozen=True)
class ConfusedPair:
    """A (true, predicted) class pair, how many test images it holds, and the positions of its examples."""

    true: int
    predicted: int
    count: int
    examples: list[int]


def top_losses(losses: Tensor, k: int) -> Tensor:
    """Positions of the ``k`` highest losses, highest first (equal losses: the earlier image first)."""
    return torch.sort(losses, descending=True, stable=True).indices[:k]


def most_confused(labels: Tensor, predicted: Tensor, losses: Tensor, pairs: int, per_pair: int) -> list[ConfusedPair]:
    """The ``pairs`` most frequent (true, predicted) pairs of distinct classes, most frequent first, each with
    the positions of up to ``per_pair`` of its images, highest loss first."""
    num_classes = int(max(labels.max(), predicted.max())) + 1
    wrong = labels != predicted
    counts = torch.bincount(labels[wrong] * num_classes + predicted[wrong], minlength=num_classes**2)
    found = []
    for code in torch.sort(counts, descending=True, stable=True).indices[:pairs].tolist():
        if counts[code] == 0:
            break
        true, guess = divmod(code, num_classes)
        members = torch.nonzero((labels == true) & (predicted == guess)).flatten()
        ranked = members[top_losses(losses[members], per_pair)]
        found.append(ConfusedPair(true, guess, int(counts[code]), ranked.tolist()))
    return found


def denormalize(batch: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """The network's normalised input (N, 3, H, W) back to pixel values in [0, 1]."""
    view = (1, -1, 1, 1)
    return (batch.float() * std.to(batch.device).view(view) + mean.to(batch.device).view(view)).clamp(0, 1)


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


def batch_grid(batch: Tensor, mean: Tensor, std: Tensor) -> Tensor:
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


class Interpretation(pl.Callback):
    """Pictures of where the model fails and where it looks, in the run folder and in TensorBoard.

    After ``test`` (and so after ``fit``): ``top_losses.png``, the ``top_k`` test images with the highest
    loss, each titled true class / predicted class / probability of the prediction, and its loss (the
    same in ``top_losses.csv``, with each image's index in the test split);
    ``top_losses_cam.png``, their Grad-CAM maps for the predicted and for the true class;
    ``most_confused.png``, ``per_pair`` examples of each of the ``confused_pairs`` most frequent
    (true, predicted) pairs (multiclass only). Losses and probabilities are those of the test (with
    flip TTA when the model uses it); the maps are those of the centre view. The extra work is one
    forward and backward pass of a few dozen images (docs/performance.md measures it).
    At the first training batch of ``fit``: ``train_batch.png``, the batch after the device transforms
    (random resized crop, flip), de-normalised. With the frozen-feature cache the batches hold features:
    the grid then shows training images spread over the set, prepared as they were for those features.

    Args:
        enabled: Write the pictures; false turns them all off.
        top_k: How many of the highest-loss test images to show.
        confused_pairs: How many of the most confused class pairs to show.
        per_pair: Examples of each confused pair.
        cam: Grad-CAM maps of the top-loss images.
        cam_layer: The module whose feature map Grad-CAM explains (a dotted name, e.g. layer3 of
            resnet18); null finds the last convolutional block before pooling.
        train_batch: Show the first training batch of ``fit``.
        train_batch_images: At most this many images of that batch.
    """

    def __init__(
        self,
        enabled: bool = True,
        top_k: int = 16,
        confused_pairs: int = 3,
        per_pair: int = 4,
        cam: bool = True,
        cam_layer: str | None = None,
        train_batch: bool = True,
        train_batch_images: int = 32,
    ) -> None:
        for name, value in (("top_k", top_k), ("per_pair", per_pair), ("train_batch_images", train_batch_images)):
            if value < 1:
                raise UserInputError(f"interpretation.{name} must be at least 1, got {value}.")
        if confused_pairs < 0:
            raise UserInputError(f"interpretation.confused_pairs must be 0 or more, got {confused_pairs}.")
        self.enabled, self.top_k, self.confused_pairs, self.per_pair = enabled, top_k, confused_pairs, per_pair
        self.cam, self.cam_layer = cam, cam_layer
        self.train_batch, self.train_batch_images = train_batch, train_batch_images
        #: The split's images as uint8, kept at setup: the frozen-feature cache swaps features into the split later.
        self._images: dict[str, ImageTensorDataset] = {}
        self._outputs: dict[str, CatMetric] = {}
        self._order: list[int] = []
        self._seen = 0
        #: Every process's test outputs, gathered at the test epoch's end, for on_test_end to draw (process 0).
        self._gathered: dict[str, Tensor] | None = None
        self._log_dir: str | None = None
        self._batch_shown = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.enabled and self.cam and self.cam_layer and hasattr(pl_module, "network"):
            resolve_cam_layer(pl_module.network, self.cam_layer)  # a wrong name fails now, not after the test
        datamodule = trainer.datamodule
        for split in ("train_set", "test_set"):
            dataset = getattr(datamodule, split, None)
            if isinstance(dataset, ImageTensorDataset) and dataset.arrays.images.dtype == torch.uint8:
                self._images[split] = ImageTensorDataset(dataset.arrays, dataset.indices)

    def _usable(self, trainer: pl.Trainer, split: str) -> bool:
        datamodule = trainer.datamodule
        return (
            self.enabled
            and split in self._images
            and all(hasattr(datamodule, name) for name in ("batch_transform", "mean", "std"))
        )

    # What training sees.
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._batch_shown = not (self.train_batch and self._usable(trainer, "train_set"))
        self._log_dir = trainer.log_dir  # a collective call under DDP: made here by every process

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if self._batch_shown:
            return
        self._batch_shown = True
        if not trainer.is_global_zero:
            return
        datamodule = trainer.datamodule
        images = batch[0][: self.train_batch_images]
        if images.ndim != 4:  # cached features: training images spread over the set, prepared as for them
            train_set = self._images["train_set"]
            count = min(self.train_batch_images, len(train_set))
            spread = torch.linspace(0, len(train_set) - 1, count).long().tolist()  # stores list images by class
            stored, _ = train_set.__getitems__(spread)
            images = datamodule.batch_transform(stored.to(pl_module.device), train=True)
        grid = batch_grid(images, datamodule.mean, datamodule.std)
        save_sheet(
            grid, Path(self._log_dir or ".") / "train_batch.png", trainer.logger, "train/batch", trainer.global_step
        )

    # Where the model fails, after test.
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_dir = trainer.log_dir  # collective under DDP
        if not self._usable(trainer, "test_set"):
            return
        loader = trainer.test_dataloaders
        loader = loader[0] if isinstance(loader, list | tuple) else loader
        self._order, self._seen = list(loader.sampler), 0  # the positions this process tests, in order
        self._outputs = {name: CatMetric().to(pl_module.device) for name in ("losses", "probabilities", "positions")}

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self._outputs or not isinstance(outputs, dict) or "losses" not in outputs:
            return
        count = len(outputs["losses"])
        positions = torch.tensor(self._order[self._seen : self._seen + count], device=pl_module.device)
        self._seen += count
        self._outputs["losses"].update(outputs["losses"].float())
        self._outputs["probabilities"].update(outputs["probabilities"].float())
        self._outputs["positions"].update(positions)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._outputs:
            return
        gathered = {name: metric.compute() for name, metric in self._outputs.items()}  # every process's images
        self._outputs = {}
        if trainer.is_global_zero and self._log_dir is not None and len(gathered["positions"]):
            self._gathered = gathered

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        gathered, self._gathered = self._gathered, None
        if gathered is None:
            return
        positions = gathered["positions"].long().cpu()
        losses, probabilities = gathered["losses"].cpu(), gathered["probabilities"].cpu()
        labels = self._images["test_set"].labels[positions]
        names = pl_module.class_names
        multilabel = getattr(pl_module, "multilabel", False)
        predicted = probabilities.argmax(dim=1)
        top = top_losses(losses, self.top_k)
        folder, logger, step = Path(self._log_dir), trainer.logger, trainer.global_step
        rows = [self._row(int(positions[i]), labels[i], probabilities[i], float(losses[i]), pl_module) for i in top]
        with atomic_path(folder / "top_losses.csv") as partial, open(partial, "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["rank", "index", "true", "predicted", "probability", "loss"])
            writer.writerows([rank, *row[:3], f"{row[3]:.6f}", f"{row[4]:.6f}"] for rank, row in enumerate(rows, 1))
        images = self._prepared(trainer, pl_module, positions[top])
        shown = denormalize(images, trainer.datamodule.mean, trainer.datamodule.std).cpu()
        titles = [f"{true} / {guess} / {p:.2f}\nloss {loss:.2f}" for _, true, guess, p, loss in rows]
        sheet = tile_sheet(list(zip(shown, titles, strict=True)), min(4, len(titles)))
        save_sheet(sheet, folder / "top_losses.png", logger, "test/top_losses", step)
        if self.cam:
            true = self._true_classes(labels[top], probabilities[top]) if multilabel else labels[top]
            self._save_maps(pl_module, images, shown, predicted[top], true, names, folder, logger, step)
        if not multilabel and self.confused_pairs:
            self._save_confused(trainer, pl_module, labels, predicted, losses, positions, names, folder, step)
        rank_zero_info(f"Top losses and activation maps: {folder}/top_losses*.png (and TensorBoard's Images tab)")

    @staticmethod
    def _row(index: int, label: Tensor, probabilities: Tensor, loss: float, pl_module) -> tuple:
        """(test index, true class, predicted class, its probability, loss) of one image; for multilabel the
        true and the predicted (at or above threshold) classes, separated by spaces, and the top probability."""
        names = pl_module.class_names
        best = int(probabilities.argmax())
        if not getattr(pl_module, "multilabel", False):
            return index, names[int(label)], names[best], float(probabilities[best]), loss
        chosen = (probabilities >= pl_module.thresholds.cpu()).tolist()
        true = " ".join(n for n, t in zip(names, label.tolist(), strict=True) if t) or "none"
        guess = " ".join(n for n, c in zip(names, chosen, strict=True) if c) or "none"
        return index, true, guess, float(probabilities[best]), loss

    def _prepared(self, trainer: pl.Trainer, pl_module: pl.LightningModule, positions: Tensor) -> Tensor:
        """The test images at ``positions`` as the network's input (the centre view), on its device."""
        stored, _ = self._images["test_set"].__getitems__(positions.tolist())
        return trainer.datamodule.batch_transform(stored.to(pl_module.device), train=False)

    @staticmethod
    def _true_classes(targets: Tensor, probabilities: Tensor) -> Tensor:
        """Multilabel: each image's true class with the lowest probability (the most missed one); the most
        probable class for an image without labels."""
        missed = torch.where(targets.bool(), probabilities, torch.inf).argmin(dim=1)
        return torch.where(targets.bool().any(dim=1), missed, probabilities.argmax(dim=1))

    def _save_maps(self, pl_module, images, shown, predicted, true, names, folder, logger, step) -> None:
        try:
            layer = resolve_cam_layer(pl_module.network, self.cam_layer, images)
        except UserInputError as error:  # a network without a map (a vision transformer): the rest still helps
            rank_zero_warn(f"No activation maps: {error}")
            return
        tiles = []
        for classes, word in ((predicted, "predicted"), (true, "true")):
            maps = grad_cam(pl_module, layer, images, classes)
            tiles.append(
                [
                    (overlay(s, m), f"{word}: {names[c]}" + ("" if m.max() > 0 else "\n(no evidence anywhere)"))
                    for s, m, c in zip(shown, maps, classes.tolist(), strict=True)
                ]
            )
        paired = [tile for pair in zip(*tiles, strict=True) for tile in pair]
        save_sheet(
            tile_sheet(paired, min(8, len(paired))), folder / "top_losses_cam.png", logger, "test/top_losses_cam", step
        )

    def _save_confused(self, trainer, pl_module, labels, predicted, losses, positions, names, folder, step) -> None:
        pairs = most_confused(labels, predicted, losses, self.confused_pairs, self.per_pair)
        if not pairs:
            return
        tiles = []
        for pair in pairs:
            shown = denormalize(
                self._prepared(trainer, pl_module, positions[pair.examples]),
                trainer.datamodule.mean,
                trainer.datamodule.std,
            ).cpu()
            title = f"{names[pair.true]} as {names[pair.predicted]}\n({pair.count} images)"
            row = [(image, title) for image in shown]
            tiles += row + [(torch.ones_like(shown[0]), "")] * (self.per_pair - len(row))
        save_sheet(
            tile_sheet(tiles, self.per_pair), folder / "most_confused.png", trainer.logger, "test/most_confused", step
        )
