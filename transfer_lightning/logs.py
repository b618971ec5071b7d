"""What a run prints: progress fit for a terminal or a log file, and no messages a user cannot act on."""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Iterable

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from tqdm import tqdm

#: Seconds between two progress lines when the output is a file, not a terminal.
LOG_FILE_INTERVAL = 30.0


def is_terminal() -> bool:
    """Whether progress bars can redraw in place (stderr, where tqdm writes, is a terminal)."""
    return sys.stderr.isatty()


def progress_bar(iterable: Iterable | None = None, **kwargs) -> tqdm:
    """tqdm, redrawn every second on a terminal, but written at most every 30 s into a log file."""
    return tqdm(iterable, mininterval=1.0 if is_terminal() else LOG_FILE_INTERVAL, **kwargs)


class _DropLightningAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("💡 Tip: For seamless")


def silence_noise() -> None:
    """Hide exactly the messages every run printed that ask nothing of the user.

    Lightning's adverts for its cloud services ("💡 Tip: For seamless cloud logging ..."), torch's
    deprecation of ``LeafSpec``, which Lightning's own code triggers, and LightningCLI's warning that
    ``args`` and ``sys.argv`` are both given, which ``lr_find`` and ``sweep`` do on purpose (they pass
    on the part of the command line that is fit's).
    """
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropLightningAdverts) for f in logger.filters):
        logger.addFilter(_DropLightningAdverts())
    leaf_spec = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
    warnings.filterwarnings("ignore", message=leaf_spec, category=FutureWarning)
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended", category=UserWarning)


class PlainProgress(pl.Callback):
    """When the output is not a terminal, a few plain lines per epoch instead of redrawn bars.

    Lightning's progress bar writes a redraw per batch, which in a log file (CI, nohup, SLURM,
    ``| tee``) piles up to hundreds of KB. Off a terminal this turns the bar off and logs one line
    every 30 s while training, and one line with the epoch's metrics when it ends. On a terminal,
    and when the progress bar is disabled, it does nothing.
    """

    def __init__(self) -> None:
        self._active = False
        self._epoch_start = self._last_line = 0.0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        bar = trainer.progress_bar_callback
        self._active = bar is not None and not is_terminal()
        if self._active:
            bar.disable()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = self._last_line = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        now = time.monotonic()
        if self._active and now - self._last_line >= LOG_FILE_INTERVAL:
            self._last_line = now
            total = trainer.num_training_batches
            rank_zero_info(
                f"{_epoch(trainer)}: batch {batch_idx + 1}/{total}, {now - self._epoch_start:.0f} s"
                f"{_metrics(trainer, ('train/loss_step',))}"
            )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._active:
            seconds = time.monotonic() - self._epoch_start
            score = pl_module.task.score if hasattr(pl_module, "task") else "acc"  # any LightningModule
            names = ("train/loss_epoch", f"train/{score}_epoch", "val/loss", f"val/{score}")
            rank_zero_info(f"{_epoch(trainer)} done in {seconds:.0f} s{_metrics(trainer, names)}")


def _epoch(trainer: pl.Trainer) -> str:
    """Counted from 0, as Lightning's own progress bar and the checkpoint names count."""
    return f"Epoch {trainer.current_epoch} ({trainer.current_epoch + 1} of {trainer.max_epochs})"


def _metrics(trainer: pl.Trainer, names: tuple[str, ...]) -> str:
    metrics = trainer.callback_metrics
    values = [f"{name} {float(metrics[name]):.4f}" for name in names if name in metrics]
    return ": " + ", ".join(values) if values else ""
