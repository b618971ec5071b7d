"""Learning-rate schedules that transfer recipes use, built from torch's own schedulers."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

from transfer_lightning.errors import UserInputError


class WarmupCosineLR(SequentialLR):
    """Linear warmup from ``start_factor x lr`` to ``lr`` over ``warmup_steps``, then cosine decay to ``eta_min``.

    torch's ``LinearLR`` followed by ``CosineAnnealingLR`` in a ``SequentialLR``, so checkpoints
    resume it as torch does. A step is an optimizer step with ``model.scheduler_interval: step``
    and an epoch otherwise. ``total_steps`` null is set by the model to the whole run.

    Args:
        optimizer: The optimizer whose learning rates it sets.
        warmup_steps: Steps of the linear warmup, at least 1 (CosineAnnealingLR alone has none).
        total_steps: Steps of the whole schedule, warmup included.
        start_factor: Fraction of the learning rate that the warmup starts from.
        eta_min: Learning rate at the end of the cosine.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int,
        total_steps: int | None = None,
        start_factor: float = 0.01,
        eta_min: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        if total_steps is None:
            raise UserInputError("WarmupCosineLR needs total_steps (TransferClassifier sets it to the whole run).")
        if not 1 <= warmup_steps < total_steps:
            raise UserInputError(
                f"WarmupCosineLR: warmup_steps must be at least 1 and fewer than total_steps ({total_steps}), "
                f"got {warmup_steps}."
            )
        warmup = LinearLR(optimizer, start_factor=start_factor, end_factor=1.0, total_iters=warmup_steps)
        cosine = CosineAnnealingLR(optimizer, T_max=total_steps - warmup_steps, eta_min=eta_min)
        super().__init__(optimizer, [warmup, cosine], milestones=[warmup_steps], last_epoch=last_epoch)
