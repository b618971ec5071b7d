"""Frozen parts of the network: which they are, BatchNorm kept in eval mode and folded into the
frozen convolutions, and gradual unfreezing.

The helpers take the network (or the LightningModule) as an argument, as Lightning's
``BaseFinetuning`` static methods do, and never import the model.
"""

from __future__ import annotations

import copy
import difflib
import warnings
from collections.abc import Iterable

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BaseFinetuning
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import nn
from torch.fx.experimental.optimization import fuse
from torch.fx.proxy import TraceError
from torch.optim import Optimizer

from transfer_lightning.errors import UserInputError
from transfer_lightning.network.batchnorm_adaptation import adapt_to_training_images

#: The public BatchNorm classes (timm's BatchNormAct2d and the lazy ones subclass them).
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def batchnorms(module: nn.Module) -> list[nn.Module]:
    """Every BatchNorm layer inside ``module``."""
    return [m for m in module.modules() if isinstance(m, BATCHNORMS)]


def modules_before(network: nn.Module, name: str) -> list[str]:
    """Names of the outermost modules of ``network`` registered before module ``name``, which
    are, in torchvision's models, the ones that run before it (``conv1``, ``bn1``, ``layer1`` ...)."""
    names = [n for n, _ in network.named_modules() if n]
    name = find_module(network, name, "model.trainable_from")
    before = []
    for candidate in names[: names.index(name)]:
        is_parent = name.startswith(candidate + ".")
        inside_earlier = any(candidate.startswith(outer + ".") for outer in before)
        if not is_parent and not inside_earlier:
            before.append(candidate)
    return before


def find_module(network: nn.Module, name: str, setting: str) -> str:
    """``name`` resolved as :func:`resolve_module_name` does; a name of no module is refused in one line that
    names the closest ones (or the outer ones), saying which ``setting`` gave it."""
    name = resolve_module_name(network, name)
    names = [n for n, _ in network.named_modules() if n]
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        top = [n for n in names if n.count(".") <= 1][:12]
        hint = f"Did you mean {', '.join(close)}?" if close else f"Its modules include {', '.join(top)}."
        raise UserInputError(f"{setting} {name!r} is not a module of the network. {hint}")
    return name


def resolve_module_name(network: nn.Module, name: str) -> str:
    """``name`` as a module of ``network``: timm's own names (``blocks.3``) are under the ``body`` of a
    :class:`~transfer_lightning.network.timm_backbones.TimmNetwork` (``body.blocks.3``)."""
    names = dict(network.named_modules())
    return f"body.{name}" if name not in names and f"body.{name}" in names else name


def parameters_of_enclosing_modules(network: nn.Module, name: str) -> list[str]:
    """Names of the parameters held directly by the modules that enclose module ``name`` (the network
    included): ViT's ``class_token`` and ``encoder.pos_embedding``. They belong to no module before
    ``name``, yet in torchvision's models they are used before it (the token and position embedding
    are added to the patches), so partial fine-tuning freezes them with those modules."""
    parts = name.split(".")
    enclosing = [".".join(parts[:depth]) for depth in range(len(parts))]
    return [
        f"{outer}.{parameter}" if outer else parameter
        for outer in enclosing
        for parameter, _ in network.get_submodule(outer).named_parameters(recurse=False)
    ]


class FrozenParts:
    """Which parameters of a network train: the head alone while the backbone is frozen, else every parameter
    from ``trainable_from`` on; and which BatchNorm layers must stay in eval mode for that.

    Args:
        network: The network, with its new head.
        head: Dotted name of the head.
        trainable_from: The first module that trains after the backbone is unfrozen (null: all of them).
        backbone_frozen: Start with the backbone frozen.
    """

    def __init__(self, network: nn.Module, head: str, trainable_from: str | None, backbone_frozen: bool) -> None:
        self.network, self.head = network, head
        #: Names of the outermost modules before ``trainable_from``: frozen for the whole run, and of the
        #: parameters that enclosing modules hold directly (ViT's class token), frozen with them.
        self.always_frozen = modules_before(network, trainable_from) if trainable_from else []
        self.always_frozen_loose = (
            parameters_of_enclosing_modules(network, resolve_module_name(network, trainable_from))
            if trainable_from
            else []
        )
        #: Whether the backbone is frozen now (with gradual unfreezing it is until the unfreeze epoch).
        self.backbone_frozen = False
        self.freeze_backbone() if backbone_frozen else self.unfreeze_backbone()

    def freeze_backbone(self) -> None:
        """Set requires_grad False on every parameter outside the head."""
        self.network.requires_grad_(False)
        self.network.get_submodule(self.head).requires_grad_(True)
        self.backbone_frozen = True

    def unfreeze_backbone(self) -> None:
        """Set requires_grad True on every parameter, except those before ``trainable_from``."""
        self.network.requires_grad_(True)
        for parameter in self.always_frozen_parameters():
            parameter.requires_grad_(False)
        self.backbone_frozen = False

    def always_frozen_parameters(self) -> list[nn.Parameter]:
        """The parameters before ``trainable_from``: frozen for the whole run."""
        inside = [p for name in self.always_frozen for p in self.network.get_submodule(name).parameters()]
        return inside + [self.network.get_parameter(name) for name in self.always_frozen_loose]

    def always_frozen_modules(self) -> list[nn.Module]:
        return [self.network.get_submodule(name) for name in self.always_frozen]

    def batchnorms(self) -> list[nn.Module]:
        """BatchNorm layers of the frozen part: the whole backbone (not the head's: ``mlp`` has its own), or the
        modules before ``trainable_from``."""
        if self.backbone_frozen:
            in_head = set(batchnorms(self.network.get_submodule(self.head)))
            return [layer for layer in batchnorms(self.network) if layer not in in_head]
        return [bn for module in self.always_frozen_modules() for bn in batchnorms(module)]


class FrozenBatchNorm(pl.Callback):
    """Runs the frozen part of a :class:`~transfer_lightning.model.TransferClassifier` as frozen.

    The model keeps the BatchNorm layers of its frozen part in eval mode whenever it is put into
    training mode (its ``train``); this callback applies that rule at every epoch start (recent
    Lightning versions keep whatever mode they find), says so once at the start of ``fit``, and
    runs the modules before ``trainable_from`` with their BatchNorm folded in (:func:`run_folded`)
    from the start of training, test and predict, after Lightning has loaded a checkpoint's
    weights. No folding with ``update_bn_stats`` in training (the statistics move) or ``compile``.
    With ``adapt_bn_stats`` it first recomputes the frozen statistics on the training images, in ``fit``'s
    ``setup`` (:func:`~transfer_lightning.network.batchnorm_adaptation.adapt_to_training_images`).
    The model adds this callback itself (``configure_callbacks``).
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and pl_module.hparams.adapt_bn_stats:
            adapt_to_training_images(trainer, pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        frozen = pl_module.frozen.batchnorms()
        if not frozen or pl_module.hparams.update_bn_stats:
            return
        until, backbone_frozen = pl_module.hparams.unfreeze_at_epoch, pl_module.frozen.backbone_frozen
        part = "backbone" if backbone_frozen else f"part before {pl_module.hparams.trainable_from}"
        when = (
            f"until the backbone is unfrozen at epoch {until}"
            if backbone_frozen and until is not None
            else "(set model.update_bn_stats true to let them drift)"
        )
        rank_zero_info(
            f"Frozen {part}: its {len(frozen)} BatchNorm layers stay in eval mode, so their "
            f"running statistics do not change {when}."
        )
        # Lightning warns about any module in eval mode at the start of training: here that is the point.
        eval_mode = r"Found \d+ module\(s\) in eval mode"
        warnings.filterwarnings("ignore", message=eval_mode, category=PossibleUserWarning)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.train()  # the model's train() keeps the frozen BatchNorm layers in eval mode

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        moving_statistics = pl_module.hparams.update_bn_stats and trainer.training
        if not moving_statistics and not pl_module.hparams.compile:
            run_folded(pl_module.frozen.always_frozen_modules())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run_unfolded(pl_module.frozen.always_frozen_modules())

    on_test_start = on_predict_start = on_train_start
    on_test_end = on_predict_end = on_train_end


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
        pl_module.frozen.freeze_backbone()

    def finetune_function(self, pl_module: pl.LightningModule, epoch: int, optimizer: Optimizer) -> None:
        if epoch >= self.unfreeze_at_epoch and pl_module.frozen.backbone_frozen:
            # Not BaseFinetuning.make_trainable: the modules before model.trainable_from stay frozen.
            pl_module.frozen.unfreeze_backbone()
            pl_module.train()  # BatchNorm layers of the backbone now train too
            rank_zero_info(f"Epoch {epoch}: the backbone is unfrozen and trained from now on.")


def run_folded(modules: Iterable[nn.Module]) -> None:
    """Make each module run an eval-mode copy of itself whose BatchNorm layers are folded into the
    convolutions before them (torch.fx's conv-BN fusion), until :func:`run_unfolded`.

    Only for modules that stay frozen, with BatchNorm in eval mode, for as long as this lasts: the
    copy computes the same function from the current weights and statistics, without the BatchNorm
    passes (faster training: docs/performance.md, "BatchNorm folded into the frozen blocks"). Only
    ``forward`` is replaced, so parameters, state_dict keys and checkpoints stay as they are. Folding
    again (after a stage that ended in an error) folds the current weights: torch.fx traces the
    class's forward, not the replaced one.
    """
    for module in modules:
        if not batchnorms(module):
            continue
        # torch.fx's fuse finds every convolution-BatchNorm pair in the traced graph and folds it with
        # torch.nn.utils.fusion.fuse_conv_bn_eval; that function alone would need the pairs found by hand.
        try:
            folded = fuse(copy.deepcopy(module).eval(), inplace=True)
        except TraceError:  # data-dependent control flow that torch.fx cannot trace: run it as it is
            continue
        module.forward = folded.forward


def run_unfolded(modules: Iterable[nn.Module]) -> None:
    """Undo :func:`run_folded`: the modules run their own forward again."""
    for module in modules:
        module.__dict__.pop("forward", None)
