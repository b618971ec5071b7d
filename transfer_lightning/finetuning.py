"""Frozen parts of the network: gradual unfreezing, and BatchNorm folded into the frozen convolutions."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BaseFinetuning
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.fx.experimental.optimization import fuse
from torch.fx.proxy import TraceError
from torch.optim import Optimizer


class GradualUnfreezing(BaseFinetuning):
    """Keeps the backbone of a :class:`~transfer_lightning.model.TransferClassifier` frozen (BatchNorm
    in eval mode) until epoch ``unfreeze_at_epoch``, then trains it too (from ``trainable_from`` on).

    The model creates the backbone's parameter group(s) in ``configure_optimizers`` already, at
    ``head lr x backbone_lr_scale``, while they are frozen: a frozen parameter has no gradient, so
    the optimizer skips it. Unfreezing then only switches ``requires_grad`` on and BatchNorm to
    training mode. So the optimizer has the same groups before and after, a scheduler sets the
    backbone's learning rate from the start, and a checkpoint from before or after the unfreeze
    epoch resumes with the groups it was saved with (Lightning issues 6891 and 8502 come from
    adding a group mid-run). The state is decided from the epoch number at every epoch start, so a
    run resumed after the unfreeze epoch is unfrozen again (Lightning issue 21901).

    The model adds this callback itself (``configure_callbacks``) when ``model.unfreeze_at_epoch`` is set.
    """

    def __init__(self, unfreeze_at_epoch: int) -> None:
        super().__init__()
        self.unfreeze_at_epoch = unfreeze_at_epoch

    def freeze_before_training(self, pl_module: pl.LightningModule) -> None:
        pl_module.freeze_backbone()

    def finetune_function(self, pl_module: pl.LightningModule, epoch: int, optimizer: Optimizer) -> None:
        if epoch >= self.unfreeze_at_epoch and pl_module.backbone_frozen:
            # Not BaseFinetuning.make_trainable: the modules before model.trainable_from stay frozen.
            pl_module.unfreeze_backbone()
            pl_module.train()  # BatchNorm layers of the backbone now train too
            rank_zero_info(f"Epoch {epoch}: the backbone is unfrozen and trained from now on.")


def run_folded(modules: Iterable[nn.Module]) -> None:
    """Make each module run an eval-mode copy of itself whose BatchNorm layers are folded into the
    convolutions before them (torch.fx's conv-BN fusion), until :func:`run_unfolded`.

    Only for modules that stay frozen, with BatchNorm in eval mode, for as long as this lasts: the
    copy computes the same function from the current weights and statistics, without the BatchNorm
    passes (MobileNetV2 from features.7 on a CPU: 1.16-1.24x the training images/s,
    benchmarks/finetune_speed.py). Only ``forward`` is replaced, so parameters, state_dict keys and
    checkpoints stay as they are. Folding again (after a stage that ended in an error) folds the
    current weights: torch.fx traces the class's forward, not the replaced one.
    """
    for module in modules:
        if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
            continue
        try:
            folded = fuse(copy.deepcopy(module).eval(), inplace=True)
        except TraceError:  # data-dependent control flow that torch.fx cannot trace: run it as it is
            continue
        module.forward = folded.forward


def run_unfolded(modules: Iterable[nn.Module]) -> None:
    """Undo :func:`run_folded`: the modules run their own forward again."""
    for module in modules:
        module.__dict__.pop("forward", None)
