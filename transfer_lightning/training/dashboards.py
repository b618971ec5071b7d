"""What TensorBoard shows of a run beyond its scalars: the HParams table with results, and one page of charts."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.tensorboard.summary import hparams as hparams_summaries


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
        score = pl_module.task.score
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
        writer = logger.experiment._get_file_writer()
        for summary in hparams_summaries(params, dict.fromkeys(self.METRICS, 0.0)):
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
    """TensorBoard's Custom Scalars tab: loss (train and val in one chart), the task's scores (accuracy; for
    multi-label mAP and F1), and learning rate.

    The Time Series tab sorts groups by name, so the charts people look at first end up below
    ``epoch`` and ``hparams``; this layout puts them on one page, train and validation together.
    """

    def __init__(self) -> None:
        self._written: set[str] = set()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logger = trainer.logger
        if isinstance(logger, TensorBoardLogger) and trainer.is_global_zero and logger.log_dir not in self._written:
            logger.experiment.add_custom_scalars(pl_module.task.dashboard())
            self._written.add(logger.log_dir)
