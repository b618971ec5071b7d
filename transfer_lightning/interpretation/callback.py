"""Where a trained classifier fails and where it looks, as pictures in the run folder and TensorBoard.

After ``test``: the test images with the highest loss (often wrongly labelled ones) and examples of
the most confused class pairs, each as the network saw it (the centre view, de-normalised), with
Grad-CAM maps (:mod:`~transfer_lightning.interpretation.cam`) for the predicted and the true class. At
the start of ``fit``: the first training batch after the device transforms, so a user sees what random
resized crop and flip do to their photos. The pictures are what fastai's ``plot_top_losses`` and
``most_confused`` and Ultralytics' ``train_batch.jpg`` show.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torchmetrics.aggregation import CatMetric

from transfer_lightning.data import ImageTensorDataset
from transfer_lightning.errors import UserInputError
from transfer_lightning.files import atomic_path
from transfer_lightning.interpretation.cam import grad_cam, resolve_cam_layer
from transfer_lightning.interpretation.pictures import batch_grid, denormalize, overlay, save_sheet, tile_sheet
from transfer_lightning.tasks import Task


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
            and all(hasattr(datamodule, name) for name in ("batch_transform", "preparation"))
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
        grid = batch_grid(images, datamodule.preparation.mean, datamodule.preparation.std)
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
        task, names = pl_module.task, pl_module.class_names
        predicted = probabilities.argmax(dim=1)
        top = top_losses(losses, self.top_k)
        folder, logger, step = Path(self._log_dir), trainer.logger, trainer.global_step
        rows = [self._row(int(positions[i]), labels[i], probabilities[i], float(losses[i]), task) for i in top]
        with atomic_path(folder / "top_losses.csv") as partial, open(partial, "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["rank", "index", "true", "predicted", "probability", "loss"])
            writer.writerows([rank, *row[:3], f"{row[3]:.6f}", f"{row[4]:.6f}"] for rank, row in enumerate(rows, 1))
        images = self._prepared(trainer, pl_module, positions[top])
        shown = denormalize(images, trainer.datamodule.preparation.mean, trainer.datamodule.preparation.std).cpu()
        titles = [f"{true} / {guess} / {p:.2f}\nloss {loss:.2f}" for _, true, guess, p, loss in rows]
        sheet = tile_sheet(list(zip(shown, titles, strict=True)), min(4, len(titles)))
        save_sheet(sheet, folder / "top_losses.png", logger, "test/top_losses", step)
        if self.cam:
            true = task.explained_class(labels[top], probabilities[top])
            self._save_maps(pl_module, images, shown, predicted[top], true, names, folder, logger, step)
        if task.single_label and self.confused_pairs:  # pairs of (true, predicted) classes
            self._save_confused(trainer, pl_module, labels, predicted, losses, positions, names, folder, step)
        rank_zero_info(f"Top losses and activation maps: {folder}/top_losses*.png (and TensorBoard's Images tab)")

    @staticmethod
    def _row(index: int, label: Tensor, probabilities: Tensor, loss: float, task: Task) -> tuple:
        """(test index, true label(s), predicted label(s), probability of the most probable class, loss)."""
        predicted = task.join(task.chosen(probabilities[None])[0]) or "none"
        return index, task.label_text(label) or "none", predicted, float(probabilities.max()), loss

    def _prepared(self, trainer: pl.Trainer, pl_module: pl.LightningModule, positions: Tensor) -> Tensor:
        """The test images at ``positions`` as the network's input (the centre view), on its device."""
        stored, _ = self._images["test_set"].__getitems__(positions.tolist())
        return trainer.datamodule.batch_transform(stored.to(pl_module.device), train=False)

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
                trainer.datamodule.preparation.mean,
                trainer.datamodule.preparation.std,
            ).cpu()
            title = f"{names[pair.true]} as {names[pair.predicted]}\n({pair.count} images)"
            row = [(image, title) for image in shown]
            tiles += row + [(torch.ones_like(shown[0]), "")] * (self.per_pair - len(row))
        save_sheet(
            tile_sheet(tiles, self.per_pair), folder / "most_confused.png", trainer.logger, "test/most_confused", step
        )
