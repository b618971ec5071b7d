"""Weight averaging: an exponential moving average (EMA) of the weights, evaluated and checkpointed as the model."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch.optim.swa_utils import get_ema_multi_avg_fn

from transfer_lightning.errors import UserInputError


class WeightEMA(WeightAveraging):
    """Keep ``ema = decay * ema + (1 - decay) * weights`` after every optimizer step (torch's
    :func:`~torch.optim.swa_utils.get_ema_multi_avg_fn` in an :class:`~torch.optim.swa_utils.AveragedModel`,
    through Lightning's :class:`~lightning.pytorch.callbacks.WeightAveraging`), over parameters and buffers.

    Validation sees the averaged weights, so the best checkpoint is picked on them; every checkpoint
    holds them as its ``state_dict`` (test, predict, export and serve use them) and the trained weights
    beside them, so ``fit --ckpt_path`` resumes both. The first average is the weights after
    ``start_step`` steps; ``decay`` 0.999 averages over about the last 1,000 steps.

    Four things differ from Lightning's callback, each for a reason:

    - the average is made at ``on_fit_start``, after the model's ``setup`` has added its buffers (class
      weights of the loss), which Lightning's ``setup`` would miss and then pair the wrong tensors;
    - loading a checkpoint outside ``fit`` (the test after ``fit``) keeps its ``state_dict``, the average:
      Lightning's would load the trained weights from ``current_model_state`` and test those;
    - ``enabled: false`` makes every hook a no-op, so the CLI can always list ``--ema.*``;
    - the task's buffers are not averaged: validation fits them to the averaged weights.

    Args:
        enabled: Average the weights.
        decay: Weight of the old average at each update, in (0, 1).
        start_step: Optimizer steps before the first update (the average starts as the weights then).
        every_n_steps: Update after every n-th optimizer step from then on.
    """

    def __init__(self, enabled: bool = False, decay: float = 0.999, start_step: int = 0, every_n_steps: int = 1):
        if not 0 < decay < 1:
            raise UserInputError(f"ema.decay must be between 0 and 1 (e.g. 0.999), got {decay}.")
        if start_step < 0 or every_n_steps < 1:
            raise UserInputError(
                f"ema.start_step must be >= 0 and ema.every_n_steps >= 1, got {start_step} and {every_n_steps}."
            )
        super().__init__(use_buffers=True, multi_avg_fn=get_ema_multi_avg_fn(decay))
        self.enabled = enabled
        self.decay = decay
        self.start_step = start_step
        self.every_n_steps = every_n_steps
        #: The averaged model's state from a checkpoint being resumed, loaded once the average exists.
        self._resumed_average: dict[str, Any] | None = None

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        if step_idx is None or step_idx < self.start_step:
            return False
        return (step_idx - self.start_step) % self.every_n_steps == 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Nothing yet: the model's own ``setup`` runs after this and may add buffers."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled:
            return
        super().setup(trainer, pl_module, "fit")
        if self._resumed_average is not None:
            self._average_model.load_state_dict(self._resumed_average)
            self._resumed_average = None
        rank_zero_info(
            f"Weight EMA: decay {self.decay}, from optimizer step {self.start_step}, every {self.every_n_steps}; "
            "validation, checkpoints and the test use the averaged weights."
        )

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self._average_model is not None:
            # The task's buffers (temperature, thresholds) are what validation fitted to the averaged weights, not
            # weights to average: kept as they are (averaging an infinite "no threshold" with itself gives NaN).
            task = self._average_model.module.task
            fitted = {name: value.clone() for name, value in task.state_dict().items()}
            super().on_train_batch_end(trainer, pl_module, *args)
            task.load_state_dict(fitted)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._average_model is not None:
            super().on_train_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if self._average_model is not None:
            super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        """Resuming ``fit``: the trained weights into the model, the average kept for ``on_fit_start``
        (without ``enabled``, training goes on from the trained weights and the average is dropped).
        Anything else evaluates the checkpoint's ``state_dict``, which is the average already."""
        if trainer.state.fn != TrainerFn.FITTING or "averaging_state" not in checkpoint:
            return
        pl_module.load_state_dict(checkpoint["current_model_state"])
        if not self.enabled:
            rank_zero_info("Weight EMA: the checkpoint holds an average; ema.enabled is false, so it is dropped.")
            return
        self._resumed_average = {f"module.{name}": value for name, value in checkpoint["state_dict"].items()}
        self._resumed_average |= checkpoint["averaging_state"]
