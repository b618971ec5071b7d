"""Callbacks that put what a reader of a run needs into its TensorBoard events."""

from __future__ import annotations

import time

import lightning.pytorch as pl
import torch


class TrainingSpeed(pl.Callback):
    """Logs ``train/images_per_sec`` each epoch: training images over the time of the training batches.

    Validation time is left out (Lightning validates before ``on_train_epoch_end``); under DDP the
    images of all processes are counted.
    """

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._images = 0
        self._start = self._end = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._images += len(batch[1])
        self._end = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._images:
            images = trainer.strategy.reduce(torch.tensor(float(self._images)), reduce_op="sum")
            pl_module.log("train/images_per_sec", images / max(self._end - self._start, 1e-9), rank_zero_only=True)


class HparamsWithResults(pl.Callback):
    """After testing, log the run's hyperparameters with its best val and its test accuracy.

    TensorBoard's HParams tab then shows one row per run. The logger's default ``hp_metric`` (a
    placeholder of -1) is switched off in the CLI, so nothing else appears there.
    """

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.logger is None or "test/acc" not in trainer.callback_metrics:
            return
        params = {**(trainer.datamodule.hparams if trainer.datamodule else {}), **pl_module.hparams}
        if trainer.optimizers:
            optimizer = trainer.optimizers[0]
            params |= {"optimizer": type(optimizer).__name__, "lr": optimizer.defaults.get("lr")}
        metrics = {"hparams/test_acc": float(trainer.callback_metrics["test/acc"])}
        checkpoint = trainer.checkpoint_callback
        if checkpoint is not None and checkpoint.best_model_score is not None:
            metrics["hparams/val_acc"] = float(checkpoint.best_model_score)
        trainer.logger.log_hyperparams(params, metrics)
