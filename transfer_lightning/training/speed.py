"""Training speed as ``train/images_per_sec``, one value per epoch."""

from __future__ import annotations

import time

import lightning.pytorch as pl
import torch


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
