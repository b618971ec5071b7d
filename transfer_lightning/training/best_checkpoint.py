"""``ModelCheckpoint`` whose monitored metric and file name follow the model's task (val/acc, or val/mAP for
several labels) unless the config names them."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

from transfer_lightning.tasks import Task

#: The value of ``checkpoint.monitor`` and ``checkpoint.filename`` that the task fills in.
AUTO = "auto"


class TaskCheckpoint(ModelCheckpoint):
    """Keeps the best checkpoint by the task's own validation score: ``monitor`` and ``filename`` ``auto`` are
    the model's ``task.monitor`` and ``task.checkpoint_filename``, filled in by :meth:`follow` (the CLI calls it once
    the model is built) or in ``setup``, before a checkpoint is saved or restored; any other value is
    ModelCheckpoint's."""

    def follow(self, task: Task | None) -> None:
        """Fill in ``auto`` from ``task`` (``None``: a module without one, so the last epoch is kept)."""
        if self.monitor == AUTO:
            self.monitor = task.monitor if task is not None else None
        if self.filename == AUTO:
            follows = task is not None and self.monitor == task.monitor
            self.filename = task.checkpoint_filename if follows else None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        task = getattr(pl_module, "task", None)  # any LightningModule may be trained with it; ours has a task
        self.follow(task if isinstance(task, Task) else None)
        super().setup(trainer, pl_module, stage)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_stale(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_stale(trainer)

    def _save_last_if_stale(self, trainer: pl.Trainer) -> None:
        """Lightning 2.6 rewrites last.ckpt only at a step whose top-k file was saved: after an epoch that did not
        improve, "last" was an older epoch and a run resumed from it lost epochs. No public API writes it."""
        stale = self._last_global_step_saved != trainer.global_step
        if self.save_last is True and stale and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    @property
    def state_key(self) -> str:
        # Saved under ModelCheckpoint's own name, so that checkpoints written with either class resume with both.
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)
