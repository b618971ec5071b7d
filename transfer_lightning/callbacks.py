"""Callbacks that put what a reader of a run needs into its TensorBoard events."""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from transfer_lightning.cam import grad_cam, resolve_cam_layer
from transfer_lightning.errors import UserInputError
from transfer_lightning.files import atomic_path
from transfer_lightning.interpretation import denormalize, explanation_picture, overlay, save_png, tile_sheet


class TrainingSpeed(pl.Callback):
    """Logs ``train/images_per_sec`` each epoch: training images over the time spent training.

    The clock stops while validation runs (mid-epoch too); under DDP the images of all processes
    are counted. On a GPU it waits for queued work only when it stops, not after every batch, so
    measuring does not slow training down.

    Not Lightning's ``ThroughputMonitor``: that one logs a rolling rate every few steps (and FLOPs when
    given a count), while ``report`` compares runs epoch by epoch, so this logs one rate per epoch.
    """

    def __init__(self) -> None:
        #: images/s of every epoch so far, for programs that run a Trainer without a logger.
        self.history: list[float] = []
        self._images, self._elapsed, self._since = 0, 0.0, None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.on_train_epoch_start(trainer, pl_module)  # a run resumed mid-epoch starts without that hook

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._images, self._elapsed, self._since = 0, 0.0, time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self._since is None:  # the first batch after a mid-epoch validation
            self._since = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # A step may say how many images it trained on (the L-BFGS head's: the whole training set).
        self._images += outputs["images"] if isinstance(outputs, dict) and "images" in outputs else len(batch[1])

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_clock(pl_module)  # a no-op when the clock is not running (sanity check, validate)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_clock(pl_module)
        if self._images:
            images = trainer.strategy.reduce(torch.tensor(float(self._images)), reduce_op="sum")
            speed = images / max(self._elapsed, 1e-9)
            self.history.append(float(speed))
            pl_module.log("train/images_per_sec", speed, rank_zero_only=True)

    def _stop_clock(self, pl_module: pl.LightningModule) -> None:
        if self._since is None:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)  # count the work queued so far
        self._elapsed += time.perf_counter() - self._since
        self._since = None


class HparamsWithResults(pl.Callback):
    """Hyperparameters in the TensorBoard events from the start; best val and test accuracy once tested.

    TensorBoard's HParams tab then shows one row per run, unfinished runs too, with
    ``hparams/val_acc`` and ``hparams/test_acc`` (multi-label runs: ``hparams/val_mAP`` and
    ``hparams/test_mAP``). The logger's own placeholder ``hp_metric`` (-1) is switched off in the CLI,
    so nothing else appears there.
    """

    METRICS = ("hparams/val_acc", "hparams/test_acc", "hparams/val_mAP", "hparams/test_mAP")

    def __init__(self) -> None:
        self._written: set[str] = set()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write_hparams(trainer, pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write_hparams(trainer, pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        score = getattr(pl_module, "monitor", "val/acc").removeprefix("val/")  # acc, or mAP
        if trainer.logger is None or f"test/{score}" not in trainer.callback_metrics:
            return
        metrics = {f"hparams/test_{score}": float(trainer.callback_metrics[f"test/{score}"])}
        checkpoint = trainer.checkpoint_callback
        if checkpoint is not None and checkpoint.best_model_score is not None and checkpoint.monitor == f"val/{score}":
            metrics[f"hparams/val_{score}"] = float(checkpoint.best_model_score)
        trainer.logger.log_metrics(metrics, step=trainer.global_step)

    def _write_hparams(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logger = trainer.logger
        if not isinstance(logger, TensorBoardLogger) or not trainer.is_global_zero or logger.log_dir in self._written:
            return
        params = {**(trainer.datamodule.hparams if trainer.datamodule else {}), **pl_module.hparams}
        if trainer.optimizers:
            optimizer = trainer.optimizers[0]
            params |= {"optimizer": type(optimizer).__name__, "lr": optimizer.defaults.get("lr")}
        params = {k: readable(v) for k, v in params.items() if k[0] != "_"}
        # Only the metric names matter here: their values are the scalars logged in on_test_end.
        # Lightning's log_hyperparams would also log placeholder values, so write the summaries directly.
        from torch.utils.tensorboard.summary import hparams  # needs tensorboard, as the logger does

        writer = logger.experiment._get_file_writer()
        for summary in hparams(params, dict.fromkeys(self.METRICS, 0.0)):
            writer.add_summary(summary)
        self._written.add(logger.log_dir)


def readable(value: object) -> float | str:
    """An hparam as the HParams table should show it: TensorBoard prints numbers as floats (1.0000, 100.00),
    so booleans become "true" / "false" and integers their digits; other floats stay numbers (sortable)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return value
    return str(value)


class DashboardLayout(pl.Callback):
    """TensorBoard's Custom Scalars tab: loss (train and val in one chart), accuracy (multi-label: mAP
    and F1), and learning rate.

    The Time Series tab sorts groups by name, so the charts people look at first end up below
    ``epoch`` and ``hparams``; this layout puts them on one page, train and validation together.
    """

    LAYOUT = {
        "training": {
            "loss (train, val)": ["Multiline", [r"train/loss_epoch", r"val/loss"]],
            "accuracy (train, val)": ["Multiline", [r"train/acc_epoch", r"val/acc"]],
            "learning rate": ["Multiline", [r"lr-.*"]],
        }
    }

    def __init__(self) -> None:
        self._written: set[str] = set()

    MULTILABEL_LAYOUT = {
        "training": {
            "loss (train, val)": ["Multiline", [r"train/loss_epoch", r"val/loss"]],
            "mAP and F1 (val)": ["Multiline", [r"val/mAP", r"val/f1_macro", r"val/f1_micro"]],
            "learning rate": ["Multiline", [r"lr-.*"]],
        }
    }

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logger = trainer.logger
        if isinstance(logger, TensorBoardLogger) and trainer.is_global_zero and logger.log_dir not in self._written:
            multilabel = getattr(pl_module, "multilabel", False)
            logger.experiment.add_custom_scalars(self.MULTILABEL_LAYOUT if multilabel else self.LAYOUT)
            self._written.add(logger.log_dir)


class CheckpointOnInterrupt(pl.Callback):
    """When ``fit`` stops early (Ctrl+C, SIGTERM, an error), save the latest state as ``last.ckpt``.

    Lightning turns SIGINT and SIGTERM into exceptions that reach ``on_exception``; its checkpoint
    writes are atomic (temporary file, then rename), so an interrupted write never leaves a file
    that loads. Resume with ``fit --ckpt_path last`` (or the file's path).
    """

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        checkpoint = trainer.checkpoint_callback
        if trainer.state.fn != "fit" or checkpoint is None or not checkpoint.dirpath or trainer.global_step == 0:
            return
        path = os.path.join(checkpoint.dirpath, checkpoint.CHECKPOINT_NAME_LAST + checkpoint.FILE_EXTENSION)
        trainer.save_checkpoint(path)
        rank_zero_info(f"Stopped early; the latest state is in {path}. Resume with: fit ... --ckpt_path last")


class PredictionsCSV(BasePredictionWriter):
    """``predict`` writes ``predictions.csv`` into the run's folder, one row per image.

    Columns: the image (its ``path`` relative to ``data.predict_dir``; or, predicting on the test
    split, its ``index`` there and its ``true_class``), the predicted class and its probability, then
    the ``top_k`` most probable classes and their probabilities. A multi-label model's columns are
    the image (``path``, or ``index`` and ``true_labels``), the ``labels`` at or above their class's
    decision threshold (separated by spaces, or by ``;`` when a class name holds a space), and every
    class's probability (``probability_<class>``). Under DDP each process writes its
    share to ``predictions_rank<N>.csv``. The file is written to a temporary name and then renamed.

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
        if self.explain and self.cam_layer:
            resolve_cam_layer(pl_module.network, self.cam_layer)  # a wrong name fails before any file is written

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        if self.explain:  # the loop has stored this batch's dataset positions for the epoch-end write
            indices = trainer.predict_loop.epoch_batch_indices[dataloader_idx][-1]
            self._explain(trainer, pl_module, batch[0], outputs["probabilities"], indices)

    def _explain(self, trainer, pl_module, images: Tensor, probabilities: Tensor, indices: list[int]) -> None:
        """Write the Grad-CAM picture of each image of a batch; keep the first ones for the contact sheet."""
        datamodule, names = trainer.datamodule, pl_module.class_names
        confidence, classes = probabilities.max(dim=1)
        maps = grad_cam(pl_module, resolve_cam_layer(pl_module.network, self.cam_layer, images), images, classes)
        shown = denormalize(images, datamodule.mean, datamodule.std).cpu()
        paths = getattr(datamodule, "predict_paths", None)
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
        paths = getattr(trainer.datamodule, "predict_paths", None)
        suffix = f"_rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        path = Path(trainer.log_dir or ".") / f"predictions{suffix}.csv"
        with atomic_path(path) as partial, open(partial, "w", newline="") as file:
            rows = zip(predictions, batch_indices[0], strict=True)  # (outputs, dataset positions) per batch
            if getattr(pl_module, "multilabel", False):
                self._write_multilabel(csv.writer(file), pl_module.class_names, paths, rows, pl_module.thresholds.cpu())
            else:
                self._write_multiclass(csv.writer(file), pl_module.class_names, paths, rows)
        rank_zero_info(f"Predictions: {path}")
        if self._sheet:
            sheet = path.with_name(f"explanations{suffix}.png")
            save_png(tile_sheet(self._sheet, min(8, len(self._sheet))), sheet)
            self._sheet = []
            rank_zero_info(f"Activation maps: {sheet.with_suffix('')}/ (one per image) and {sheet}")

    def _write_multiclass(self, writer, names: list[str], paths: list[str] | None, batches) -> None:
        k = min(self.top_k, len(names))
        image_columns = ["path"] if paths is not None else ["index", "true_class"]
        ranked_columns = [f"top{rank}_{what}" for rank in range(1, k + 1) for what in ("class", "probability")]
        writer.writerow([*image_columns, "predicted_class", "probability", *ranked_columns])
        for output, indices in batches:
            top_probabilities, top_classes = output["probabilities"].topk(k, dim=-1)
            for index, label, classes, probabilities in zip(
                indices, output["labels"].tolist(), top_classes.tolist(), top_probabilities.tolist(), strict=True
            ):
                image = [paths[index]] if paths is not None else [index, names[label]]
                ranked = [x for c, p in zip(classes, probabilities, strict=True) for x in (names[c], f"{p:.6f}")]
                writer.writerow([*image, *ranked[:2], *ranked])

    @staticmethod
    def _write_multilabel(writer, names: list[str], paths: list[str] | None, batches, thresholds: Tensor) -> None:
        delimiter = ";" if any(" " in name for name in names) else " "
        image_columns = ["path"] if paths is not None else ["index", "true_labels"]
        writer.writerow([*image_columns, "labels", *(f"probability_{name}" for name in names)])
        for output, indices in batches:
            probabilities = output["probabilities"].cpu()
            for index, label, row in zip(indices, output["labels"], probabilities, strict=True):
                if paths is not None:
                    image = [paths[index]]
                else:
                    true = label.tolist() if label.ndim else [int(i == label) for i in range(len(names))]
                    image = [index, delimiter.join(n for n, t in zip(names, true, strict=True) if t)]
                predicted = delimiter.join(
                    n for n, chosen in zip(names, (row >= thresholds).tolist(), strict=True) if chosen
                )
                writer.writerow([*image, predicted, *(f"{p:.6f}" for p in row.tolist())])


class ClassificationReportFiles(pl.Callback):
    """After ``test``: the classification report printed and saved as ``classification_report.md`` in
    the run folder, and (multiclass) the confusion matrix as a TensorBoard figure.

    Reads the report that the model's ``on_test_epoch_end`` left in ``test_report``. The model adds
    this callback itself (``configure_callbacks``).
    """

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if getattr(pl_module, "test_report", None) is None:
            return
        report, confusion = pl_module.test_report
        log_dir = trainer.log_dir  # a collective call under DDP: every process must make it
        if not trainer.is_global_zero:
            return
        if isinstance(trainer.logger, TensorBoardLogger) and confusion is not None:
            figure, _ = pl_module.test_metrics.confusion.plot(confusion, labels=report.class_names)
            figure.set_size_inches(8, 8)
            trainer.logger.experiment.add_figure("test/confusion_matrix", figure, global_step=trainer.global_step)
        text = report.to_markdown()
        if log_dir is not None:
            path = Path(log_dir) / "classification_report.md"
            with atomic_path(path) as partial:
                partial.write_text(text)
            text += f"\n(saved as {path})"
        rank_zero_info("\n" + text)
