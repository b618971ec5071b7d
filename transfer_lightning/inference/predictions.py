"""``predict``'s output: ``predictions.csv``, and with ``explain`` each image's activation map."""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from transfer_lightning.data import ImageFolderDataModule
from transfer_lightning.errors import UserInputError
from transfer_lightning.files import atomic_path
from transfer_lightning.inference.export import Outputs
from transfer_lightning.interpretation.cam import grad_cam, resolve_cam_layer
from transfer_lightning.interpretation.pictures import denormalize, explanation_picture, overlay, save_png, tile_sheet


class PredictionsCSV(BasePredictionWriter):
    """``predict`` writes ``predictions.csv`` into the run's folder, one row per image.

    Columns: the image (its ``path`` relative to ``data.predict_dir``; or, predicting on the test
    split, its ``index`` there and its ``true_class``), the predicted class and its probability, its
    ``unknown_score`` and whether it is ``unknown`` (above the threshold chosen on validation, see
    ``model.known_rate``; ``predicted_class`` then reads ``unknown``, and ``probability`` is the closest
    class's), then the ``top_k`` most probable classes and their probabilities. A multi-label model's columns are
    the image (``path``, or ``index`` and ``true_labels``), the ``labels`` at or above their class's
    decision threshold (separated by spaces, or by ``;`` when a class name holds a space), and every
    class's probability (``probability_<class>``). Under DDP each process writes its
    share to ``predictions_rank<N>.csv``. Of a stream (``data.streaming_dir``), ``index`` counts the test
    split's images in the order the optimized data set holds them. The file is written to a temporary name and
    then renamed.

    With ``explain``, each image also gets its Grad-CAM map for the predicted class (for multilabel, the
    most probable one): ``explanations/<path>.png`` next to the CSV (``<path>`` itself for a PNG, and
    ``explanations/test_<index>.png`` predicting on the test split) holds the image as the network saw
    it beside the map over it, and ``explanations.png`` is a contact sheet of the first :data:`SHEET_IMAGES`.

    Args:
        top_k: How many of the most probable classes to list (at most the number of classes).
        explain: Also write the Grad-CAM map of every image (one backward pass per batch).
        cam_layer: The module whose feature map Grad-CAM explains (a dotted name); null finds the last
            convolutional block before pooling.
    """

    #: Images on the contact sheet of ``explain``.
    SHEET_IMAGES = 64

    def __init__(self, top_k: int = 5, explain: bool = False, cam_layer: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        if top_k < 1:
            raise UserInputError(f"predictions.top_k must be at least 1, got {top_k}.")
        self.top_k, self.explain, self.cam_layer = top_k, explain, cam_layer
        self._sheet: list[tuple[Tensor, str]] = []
        self._log_dir: str | None = None

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_dir = trainer.log_dir  # a collective call under DDP: made here by every process
        self._sheet = []
        #: Images served so far: a stream (an IterableDataset) has no positions, so they are counted in order.
        self._streamed = 0
        if self.explain and self.cam_layer:
            resolve_cam_layer(pl_module.network, self.cam_layer)  # a wrong name fails before any file is written

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        if self.explain:  # the loop has stored this batch's dataset positions for the epoch-end write
            stored = trainer.predict_loop.epoch_batch_indices[dataloader_idx]
            indices = stored[-1] if stored else list(range(self._streamed, self._streamed + len(batch[0])))
            self._explain(trainer, pl_module, batch[0], outputs["probabilities"], indices)
        self._streamed += len(batch[0])

    def _explain(self, trainer, pl_module, images: Tensor, probabilities: Tensor, indices: list[int]) -> None:
        """Write the Grad-CAM picture of each image of a batch; keep the first ones for the contact sheet."""
        datamodule, names = trainer.datamodule, pl_module.class_names
        confidence, classes = probabilities.max(dim=1)  # the predicted class; for multilabel the most probable
        maps = grad_cam(pl_module, resolve_cam_layer(pl_module.network, self.cam_layer, images), images, classes)
        shown = denormalize(images, datamodule.preparation.mean, datamodule.preparation.std).cpu()
        paths = datamodule.predict_paths if isinstance(datamodule, ImageFolderDataModule) else None
        folder = Path(self._log_dir or ".") / "explanations"
        for index, image, cam, label, p in zip(
            indices, shown, maps, classes.tolist(), confidence.tolist(), strict=True
        ):
            name = paths[index] if paths is not None else f"test_{index:05d}"
            save_png(
                explanation_picture(image, cam), folder / (name if name.lower().endswith(".png") else f"{name}.png")
            )
            if len(self._sheet) < self.SHEET_IMAGES:
                self._sheet.append((overlay(image, cam), f"{Path(name).name}\n{names[label]} {p:.2f}"))

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        datamodule = trainer.datamodule
        paths = datamodule.predict_paths if isinstance(datamodule, ImageFolderDataModule) else None
        suffix = f"_rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        path = Path(trainer.log_dir or ".") / f"predictions{suffix}.csv"
        task, top_k = pl_module.task, min(self.top_k, len(pl_module.class_names))
        with atomic_path(path) as partial, open(partial, "w", newline="") as file:
            writer = csv.writer(file)
            image_columns = ["path"] if paths is not None else ["index", task.true_column]
            writer.writerow([*image_columns, *task.prediction_header(top_k)])
            for output, indices in zip(predictions, positions(predictions, batch_indices), strict=True):
                outputs = Outputs(output["probabilities"], output.get("unknown_scores")).cpu()
                for index, label, (row, score) in zip(
                    indices, output["labels"].cpu(), outputs.per_image(), strict=True
                ):
                    image = [paths[index]] if paths is not None else [index, task.label_text(label)]
                    writer.writerow([*image, *task.prediction_cells(row, top_k, score)])
        rank_zero_info(f"Predictions: {path}")
        if self._sheet:
            sheet = path.with_name(f"explanations{suffix}.png")
            save_png(tile_sheet(self._sheet, min(8, len(self._sheet))), sheet)
            self._sheet = []
            rank_zero_info(f"Activation maps: {sheet.with_suffix('')}/ (one per image) and {sheet}")


def positions(predictions: list[dict], batch_indices: list[list[list[int]]]) -> list[list[int]]:
    """Each batch's positions in the predicted split: as the loop recorded them, or for a stream (which has none)
    counted in the order it served the images (the optimized split's order, this process's share under DDP)."""
    if batch_indices and batch_indices[0]:
        return batch_indices[0]
    counts = [len(output["probabilities"]) for output in predictions]
    ends = list(itertools.accumulate(counts))
    return [list(range(end - count, end)) for end, count in zip(ends, counts, strict=True)]
