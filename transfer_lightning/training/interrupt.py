"""A ``last.ckpt`` whenever ``fit`` stops early, so Ctrl+C or a killed job never loses the run."""

from __future__ import annotations

import os

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info


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
