"""TransferClassifier: a pretrained torchvision backbone with a new head, fine-tuned or frozen."""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import warnings
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from transfer_lightning.backbones import create_network
from transfer_lightning.errors import UserInputError
from transfer_lightning.evaluation import ClassificationMetrics
from transfer_lightning.files import atomic_path
from transfer_lightning.finetuning import GradualUnfreezing, run_folded, run_unfolded

#: Settings that decide the optimizer's parameter groups: a resumed fit must keep the checkpoint's.
PARAMETER_GROUP_HPARAMS = ["freeze_backbone", "trainable_from", "unfreeze_at_epoch", "no_weight_decay_on_norm_and_bias"]

#: Layers whose parameters ``no_weight_decay_on_norm_and_bias`` exempts from weight decay.
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


class TransferClassifier(pl.LightningModule):
    """An ImageNet-pretrained torchvision classifier whose last Linear layer is replaced for the task.

    Args:
        backbone: torchvision classification model name (resnet18, mobilenet_v2, ...).
        weights: torchvision weights name (DEFAULT, IMAGENET1K_V1), a local state_dict file
            (with or without the classifier), or null for random initialisation.
        num_classes: Outputs of the new head; linked from the datamodule by the CLI.
        class_names: Names of the classes, for per-class test metrics; linked from the datamodule.
        freeze_backbone: Train only the new head (fixed feature extractor). The backbone's
            BatchNorm layers then stay in eval mode, so their running statistics never move.
        update_bn_stats: With freeze_backbone, let the BatchNorm running statistics drift in
            training as the reference recipe did (it froze the weights but kept the model in train
            mode). Off by default: with it, the "frozen" features change from epoch to epoch.
        channels_last: Run the network in channels-last memory format: oneDNN and cuDNN run
            convolutions faster so (2.7x for MobileNetV2 training on this project's CPU, see
            docs/performance.md). false keeps PyTorch's default (contiguous) layout.
        compile: torch.compile the network before training (slow start, faster steps on GPU).
        optimizer: Optimizer class and arguments (class_path: torch.optim.SGD, ...); it receives
            only the trainable parameters.
        scheduler: Learning-rate scheduler; null keeps the rate constant. A scheduler that takes
            ``total_steps`` (OneCycleLR, :class:`~transfer_lightning.schedules.WarmupCosineLR`) gets
            the whole run's count when the config leaves it unset.
        scheduler_interval: Step the scheduler once per ``epoch`` (the reference recipe) or once per
            optimizer ``step`` (warmup and one-cycle schedules); the learning rate is logged as often.
        label_smoothing: Label smoothing of the training loss (0 = none; 0.1 is common). Validation
            and test losses stay plain cross-entropy, comparable between runs.
        no_weight_decay_on_norm_and_bias: Exempt normalisation layers and biases from the optimizer's
            weight decay (their own parameter group), as most fine-tuning recipes do.
        trainable_from: Partial fine-tuning: train the network only from this module on (its dotted
            name: ``features.7`` of mobilenet_v2, ``layer3`` of resnet18). The modules registered
            before it, which in torchvision's models are the ones that run before it, stay frozen with
            BatchNorm in eval mode, so they need no backward pass, and run with their BatchNorm folded
            into the convolutions: from ``features.7``, mobilenet_v2 trains 2.9x (96 px) to 4.6x
            (128 px) the images/s of the whole network on a 2-core CPU (docs/performance.md). Early
            layers detect edges and textures, which transfer as they are.
        unfreeze_at_epoch: With freeze_backbone, train the whole network (from trainable_from on, when
            set) from this epoch (counted from 0) on: gradual unfreezing. BatchNorm stays in eval mode
            until then, and trains after.
        backbone_lr_scale: With unfreeze_at_epoch, the backbone's learning rate is the head's times
            this (discriminative learning rates). Its parameter group exists from the start, frozen.
        tta_flip: Test-time augmentation in validation, test, predict and exported models: average
            the class probabilities of each image and its mirror image (twice the evaluation work).
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        weights: str | None = "DEFAULT",
        num_classes: int = 10,
        class_names: list[str] | None = None,
        freeze_backbone: bool = False,
        update_bn_stats: bool = False,
        channels_last: bool = True,
        compile: bool = False,
        optimizer: OptimizerCallable = torch.optim.Adam,
        scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["epoch", "step"] = "epoch",
        label_smoothing: float = 0.0,
        no_weight_decay_on_norm_and_bias: bool = False,
        trainable_from: str | None = None,
        unfreeze_at_epoch: int | None = None,
        backbone_lr_scale: float = 0.1,
        tta_flip: bool = False,
    ) -> None:
        super().__init__()
        if class_names is not None and len(class_names) != num_classes:
            raise UserInputError(f"{len(class_names)} class_names given for num_classes={num_classes}.")
        if scheduler_interval not in ("epoch", "step"):
            raise UserInputError(f"scheduler_interval must be epoch or step, got {scheduler_interval!r}.")
        if not 0 <= label_smoothing < 1:
            raise UserInputError(f"label_smoothing must be in [0, 1), got {label_smoothing}.")
        if unfreeze_at_epoch is not None and (not freeze_backbone or unfreeze_at_epoch < 0):
            raise UserInputError(
                f"unfreeze_at_epoch {unfreeze_at_epoch} needs freeze_backbone: true and an epoch >= 0 "
                "(the backbone is frozen until then)."
            )
        if backbone_lr_scale <= 0:
            raise UserInputError(f"backbone_lr_scale must be positive, got {backbone_lr_scale}.")
        if trainable_from is not None and freeze_backbone and unfreeze_at_epoch is None:
            raise UserInputError(
                f"trainable_from {trainable_from!r} says where fine-tuning starts, but freeze_backbone: true "
                "trains only the head: set freeze_backbone false, or unfreeze_at_epoch."
            )
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.network, self.head_name = create_network(backbone, weights, num_classes)
        #: Names of the outermost modules before ``trainable_from``: frozen for the whole run.
        self.always_frozen = modules_before(self.network, trainable_from) if trainable_from else []
        self.class_names = class_names or [str(i) for i in range(num_classes)]
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        #: Whether the backbone is frozen now (with unfreeze_at_epoch it is until that epoch).
        self.backbone_frozen = False
        if freeze_backbone:
            self.freeze_backbone()
        else:
            self.unfreeze_backbone()
        #: Set by :class:`~transfer_lightning.features.FrozenFeatureCache` while batches hold the
        #: cached inputs of :attr:`classifier_block` instead of images.
        self.inputs_are_features = False
        self._compiled = False
        #: Per-class weights of the training loss (``data.class_balance: loss``), set in :meth:`setup`.
        self.register_buffer("loss_weights", None, persistent=False)

        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_metrics = ClassificationMetrics(num_classes)

    @property
    def head(self) -> nn.Linear:
        return self.network.get_submodule(self.head_name)

    def freeze_backbone(self) -> None:
        """Set requires_grad False on every parameter outside the head."""
        self.network.requires_grad_(False)
        self.head.requires_grad_(True)
        self.backbone_frozen = True

    def unfreeze_backbone(self) -> None:
        """Set requires_grad True on every parameter, except those before ``trainable_from``."""
        self.network.requires_grad_(True)
        for name in self.always_frozen:
            self.network.get_submodule(name).requires_grad_(False)
        self.backbone_frozen = False

    @property
    def classifier_block(self) -> nn.Module:
        """The top-level part of the network that holds the head (``fc``; ``classifier`` with its dropout)."""
        return self.network.get_submodule(self.head_name.split(".")[0])

    @torch.no_grad()
    def classifier_inputs(self, images: Tensor) -> Tensor:
        """What :attr:`classifier_block` receives for ``images``: the backbone's pooled features."""
        captured = []
        hook = self.classifier_block.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        try:
            self(images)
        finally:
            hook.remove()
        return captured[0]

    def backbone_batchnorms(self) -> list[nn.Module]:
        return batchnorms(self.network)

    def frozen_batchnorms(self) -> list[nn.Module]:
        """BatchNorm layers of the frozen part: the whole backbone, or the modules before ``trainable_from``."""
        if self.backbone_frozen:
            return self.backbone_batchnorms()
        return [bn for name in self.always_frozen for bn in batchnorms(self.network.get_submodule(name))]

    def train(self, mode: bool = True) -> TransferClassifier:
        """Switch modes as usual, but keep the BatchNorm layers of frozen modules in eval mode."""
        super().train(mode)
        if mode and not self.hparams.update_bn_stats:
            for batchnorm in self.frozen_batchnorms():
                batchnorm.eval()
        return self

    def on_fit_start(self) -> None:
        frozen = self.frozen_batchnorms()
        if frozen and not self.hparams.update_bn_stats:
            until = self.hparams.unfreeze_at_epoch
            part = "backbone" if self.backbone_frozen else f"part before {self.hparams.trainable_from}"
            when = (
                f"until the backbone is unfrozen at epoch {until}"
                if self.backbone_frozen and until is not None
                else "(set model.update_bn_stats true to let them drift)"
            )
            rank_zero_info(
                f"Frozen {part}: its {len(frozen)} BatchNorm layers stay in eval mode, so their "
                f"running statistics do not change {when}."
            )
            # Lightning warns about any module in eval mode at the start of training: here that is the point.
            eval_mode = r"Found \d+ module\(s\) in eval mode"
            warnings.filterwarnings("ignore", message=eval_mode, category=PossibleUserWarning)

    def on_train_start(self) -> None:
        """Run the modules before ``trainable_from`` with their BatchNorms folded in (see :func:`run_folded`).

        Also at the start of test and predict, after Lightning has loaded the checkpoint's weights.
        Not with ``update_bn_stats`` in training (their statistics move), nor with ``compile``.
        """
        moving_statistics = self.hparams.update_bn_stats and self.trainer.training
        if not moving_statistics and not self.hparams.compile:
            run_folded(self.network.get_submodule(name) for name in self.always_frozen)

    def on_train_end(self) -> None:
        run_unfolded(self.network.get_submodule(name) for name in self.always_frozen)

    on_test_start = on_predict_start = on_train_start
    on_test_end = on_predict_end = on_train_end

    def on_train_epoch_start(self) -> None:
        # A new module starts in train mode and recent Lightning versions keep whatever mode they find
        # (older ones called .train() every epoch), so apply the frozen-BatchNorm rule here, every epoch.
        self.train()

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule if self._trainer else None
        input_size = getattr(datamodule, "input_size", None)
        if input_size is not None:
            self.check_input_size(input_size)
        self.loss_weights = getattr(datamodule, "loss_weights", None)
        if self.hparams.channels_last:
            self.network.to(memory_format=torch.channels_last)
        if self.hparams.compile and not self._compiled:
            self.network.compile()  # in place: state_dict keys and checkpoints stay as they are
            self._compiled = True

    @torch.no_grad()
    def check_input_size(self, size: tuple[int, int]) -> None:
        """Run one blank image of ``size`` through the network, so a size it cannot take fails here, clearly."""
        was_training = self.training
        self.eval()
        try:
            self.network(torch.zeros(1, 3, *size, device=self.device))
        except (RuntimeError, ValueError, AssertionError) as error:
            raise UserInputError(
                f"{self.hparams.backbone} cannot take {size[0]}x{size[1]} images ({error}). "
                "Set --data.image_size to a size it accepts, e.g. 224."
            ) from None
        finally:
            self.train(was_training)

    def forward(self, images: Tensor) -> Tensor:
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.network(images)

    def logits(self, inputs: Tensor) -> Tensor:
        """Class scores for a batch of images, or of cached features (see :attr:`inputs_are_features`)."""
        return self.classifier_block(inputs) if self.inputs_are_features else self(inputs)

    def evaluation_logits(self, inputs: Tensor) -> Tensor:
        """Class scores for evaluation; with ``tta_flip`` the log of the mean probabilities of each
        image and its mirror image (so softmax, accuracy and cross-entropy all see the average)."""
        logits = self.logits(inputs)
        if not self.hparams.tta_flip:
            return logits
        both = torch.stack([logits.log_softmax(dim=-1), self.logits(inputs.flip(-1)).log_softmax(dim=-1)])
        return torch.logsumexp(both, dim=0) - math.log(2)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        logits = self.logits(images)
        loss = F.cross_entropy(logits, labels, weight=self.loss_weights, label_smoothing=self.hparams.label_smoothing)
        self.train_acc(logits, labels)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self.evaluation_logits(images)
        self.val_acc(logits, labels)
        self.log("val/loss", F.cross_entropy(logits, labels), sync_dist=True, prog_bar=True)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self.evaluation_logits(images)
        self.test_acc(logits, labels)
        self.test_metrics.update(logits, labels)
        self.log("test/loss", F.cross_entropy(logits, labels), sync_dist=True)
        self.log("test/acc", self.test_acc)

    def on_test_epoch_end(self) -> None:
        """Per-class accuracy (classes with test images only), macro-F1, top-5, the confusion matrix
        figure, and ``classification_report.md`` in the run folder, also printed."""
        report, confusion = self.test_metrics.compute(self.class_names)
        self.test_metrics.reset()
        self.log("test/f1_macro", report.macro_f1)
        if report.top_k_accuracy is not None:
            self.log("test/acc_top5", report.top_k_accuracy)
        for name, recall, present in zip(self.class_names, report.recall, report.present, strict=True):
            if present:  # a class without test images has no accuracy, rather than 0%
                self.log(f"test/acc_{name}", recall)
        log_dir = self.trainer.log_dir  # a collective call under DDP: every process must make it
        if not self.trainer.is_global_zero:
            return
        if isinstance(self.logger, TensorBoardLogger):
            figure, _ = self.test_metrics.confusion.plot(confusion, labels=self.class_names)
            figure.set_size_inches(8, 8)
            self.logger.experiment.add_figure("test/confusion_matrix", figure, global_step=self.global_step)
        text = report.to_markdown()
        if log_dir is not None:
            path = Path(log_dir) / "classification_report.md"
            with atomic_path(path) as partial:
                partial.write_text(text)
            text += f"\n(saved as {path})"
        rank_zero_info("\n" + text)

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Class probabilities of each image, with its true label when the data has one."""
        images, labels = batch
        return {"probabilities": self.evaluation_logits(images).softmax(dim=-1), "labels": labels}

    def configure_optimizers(self) -> Any:
        try:
            optimizer = self.optimizer_factory(self.parameter_groups())
        except (TypeError, ValueError) as error:
            raise UserInputError(
                f"model.optimizer rejected its arguments: {error}. Fix model.optimizer.init_args."
            ) from None
        if any(group["lr"] <= 0 for group in optimizer.param_groups):
            raise UserInputError(f"The learning rate must be positive, got {optimizer.param_groups[0]['lr']}.")
        for group in optimizer.param_groups:
            if group.get("name", "").startswith("backbone"):
                group["lr"] *= self.hparams.backbone_lr_scale
        if self.scheduler_factory is None:
            return optimizer
        try:
            scheduler = self.scheduler_factory(optimizer, **self._scheduler_length())
        except (TypeError, ValueError) as error:
            raise UserInputError(
                f"model.scheduler rejected its arguments: {error}. Fix model.scheduler.init_args."
            ) from None
        interval = self.hparams.scheduler_interval
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": interval, "monitor": "val/loss"},
        }

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The parameters to optimize, in named groups when there are several.

        With ``unfreeze_at_epoch``: ``head`` and ``backbone`` (frozen for now, from ``trainable_from`` on
        when set; its learning rate is scaled in :meth:`configure_optimizers`). With
        ``no_weight_decay_on_norm_and_bias``: each also split into decayed weights and ``... no decay``
        (normalisation layers and biases, weight decay 0).
        """
        unfreezes = self.hparams.unfreeze_at_epoch is not None
        never = {id(p) for name in self.always_frozen for p in self.network.get_submodule(name).parameters()}
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad or (unfreezes and id(p) not in never)]
        if unfreezes:
            head = {id(p) for p in self.head.parameters()}
            parts = {
                "head": [(n, p) for n, p in named if id(p) in head],
                "backbone": [(n, p) for n, p in named if id(p) not in head],
            }
        else:
            parts = {"all": named}
        groups = []
        if self.hparams.no_weight_decay_on_norm_and_bias:
            norms = {id(p) for module in self.modules() if isinstance(module, NORM_LAYERS) for p in module.parameters()}
            exempt = lambda name, p: id(p) in norms or name.endswith(".bias")  # noqa: E731
            for part, params in parts.items():
                groups.append({"params": [p for n, p in params if not exempt(n, p)], "name": part})
                no_decay = [p for n, p in params if exempt(n, p)]
                groups.append({"params": no_decay, "weight_decay": 0.0, "name": f"{part} no decay"})
        else:
            groups = [{"params": [p for _, p in params], "name": part} for part, params in parts.items()]
        if len(groups) == 1:
            del groups[0]["name"]  # one group: LearningRateMonitor logs it as lr-<Optimizer>, as always
        return groups

    def _scheduler_length(self) -> dict[str, int]:
        """``total_steps`` for a scheduler that takes it and was not given it (nor OneCycleLR's epochs)."""
        factory = self.scheduler_factory
        if isinstance(factory, functools.partial):  # what LightningCLI builds: the class with every argument bound
            arguments = factory.keywords
        else:
            arguments = {name: p.default for name, p in inspect.signature(factory).parameters.items()}
        unset = lambda name: name in arguments and arguments[name] is None  # noqa: E731
        given_epochs = "epochs" in arguments and not unset("epochs")  # OneCycleLR(epochs, steps_per_epoch)
        if not unset("total_steps") or given_epochs:
            return {}
        if self.hparams.scheduler_interval == "step":
            return {"total_steps": int(self.trainer.estimated_stepping_batches)}
        if self.trainer.max_epochs is None or self.trainer.max_epochs < 1:
            raise UserInputError(
                "The scheduler needs total_steps: set trainer.max_epochs or model.scheduler's total_steps."
            )
        return {"total_steps": self.trainer.max_epochs}

    def configure_callbacks(self) -> list[pl.Callback]:
        """Gradual unfreezing, when ``unfreeze_at_epoch`` is set."""
        attached = self._trainer is not None and any(isinstance(c, GradualUnfreezing) for c in self.trainer.callbacks)
        if self.hparams.unfreeze_at_epoch is None or attached:  # attached by an earlier fit of this trainer
            return []
        return [GradualUnfreezing(self.hparams.unfreeze_at_epoch)]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another backbone or class count with a clear message; when resuming
        ``fit``, also one whose settings made other optimizer parameter groups than this model's."""
        saved = checkpoint.get("hyper_parameters", {})
        keys = ["backbone", "num_classes"]
        if self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING:
            keys += PARAMETER_GROUP_HPARAMS
        for key in keys:
            if key in saved and saved[key] != self.hparams[key]:
                raise UserInputError(
                    f"The checkpoint was trained with {key}={saved[key]!r}, "
                    f"but this model has {key}={self.hparams[key]!r}. "
                    f"Use a config with {key}: {saved[key]!r}, or another checkpoint."
                )


def batchnorms(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def modules_before(network: nn.Module, name: str) -> list[str]:
    """Names of the outermost modules of ``network`` registered before module ``name``, which
    are, in torchvision's models, the ones that run before it (``conv1``, ``bn1``, ``layer1`` ...)."""
    names = [n for n, _ in network.named_modules() if n]
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        top = [n for n in names if n.count(".") <= 1][:12]
        hint = f"Did you mean {', '.join(close)}?" if close else f"Its modules include {', '.join(top)}."
        raise UserInputError(f"model.trainable_from {name!r} is not a module of the network. {hint}")
    before = []
    for candidate in names[: names.index(name)]:
        is_parent = name.startswith(candidate + ".")
        inside_earlier = any(candidate.startswith(outer + ".") for outer in before)
        if not is_parent and not inside_earlier:
            before.append(candidate)
    return before
