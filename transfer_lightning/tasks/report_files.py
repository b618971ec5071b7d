"""The test report in the run folder and the log: ``classification_report.md``, and its figures in TensorBoard."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from transfer_lightning.files import atomic_path


class ClassificationReportFiles(pl.Callback):
    """After ``test``: the task's report printed and saved as ``classification_report.md`` in the run
    folder, and its figures (the multiclass confusion matrix) in TensorBoard.

    Reads the report that the model's ``on_test_epoch_end`` left in ``test_report``. The model adds
    this callback itself (``configure_callbacks``).
    """

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        report = getattr(pl_module, "test_report", None)
        if report is None:
            return
        log_dir = trainer.log_dir  # a collective call under DDP: every process must make it
        if not trainer.is_global_zero:
            return
        if isinstance(trainer.logger, TensorBoardLogger):
            for tag, figure in report.figures().items():
                trainer.logger.experiment.add_figure(tag, figure, global_step=trainer.global_step)
        text = report.to_markdown()
        if log_dir is not None:
            path = Path(log_dir) / "classification_report.md"
            with atomic_path(path) as partial:
                partial.write_text(text)
            text += f"\n(saved as {path})"
        rank_zero_info("\n" + text)
