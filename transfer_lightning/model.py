"""TransferClassifier: a pretrained torchvision backbone with a new head, fine-tuned or frozen.

The LightningModule holds the network, its steps and metrics. The pieces it is built from live in
their own modules and take it, or its network, as an argument: the network and where its head is
(:mod:`~transfer_lightning.backbones`), which parts are frozen and how they run
(:mod:`~transfer_lightning.finetuning`), the optimizer's groups and the schedule's length
(:mod:`~transfer_lightning.optimization`), checkpoint checks (:mod:`~transfer_lightning.checkpoints`)
and the test report's files (:class:`~transfer_lightning.callbacks.ClassificationReportFiles`).
It is over 300 lines because a third of them document the arguments, which LightningCLI turns into
``--help`` and the YAML configs.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from transfer_lightning import checkpoints, linear_probe
from transfer_lightning.backbones import create_network
from transfer_lightning.callbacks import ClassificationReportFiles
from transfer_lightning.errors import UserInputError
from transfer_lightning.evaluation import (
    DEFAULT_THRESHOLD,
    ClassificationMetrics,
    ClassificationReport,
    MultilabelOutputs,
    MultilabelReport,
    average_precisions,
    mean_over_present,
    multilabel_f1,
    multilabel_report,
    pick_thresholds,
)
from transfer_lightning.finetuning import (
    FrozenBatchNorm,
    GradualUnfreezing,
    batchnorms,
    modules_before,
    parameters_of_enclosing_modules,
)
from transfer_lightning.optimization import build_optimizer, build_scheduler, parameter_groups

#: The backbone's learning rate relative to the head's after gradual unfreezing, unless set.
DEFAULT_BACKBONE_LR_SCALE = 0.1
Task = Literal["multiclass", "multilabel"]
HeadSolver = Literal["gradient", "lbfgs"]
#: The validation metric that picks the best checkpoint, per task.
MONITORED = {"multiclass": "val/acc", "multilabel": "val/mAP"}


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
        channels_last: Run the network in channels-last memory format, in which oneDNN and cuDNN
            run convolutions faster (docs/performance.md measures it on this project's CPUs). false
            keeps PyTorch's default (contiguous) layout.
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
            into the convolutions (docs/performance.md measures the speed-up). Parameters held
            directly by a module enclosing it (ViT's class token and position embedding) are frozen
            too. Early layers detect edges and textures, which transfer as they are.
        unfreeze_at_epoch: With freeze_backbone, train the whole network (from trainable_from on, when
            set) from this epoch (counted from 0) on: gradual unfreezing. BatchNorm stays in eval mode
            until then, and trains after.
        backbone_lr_scale: With unfreeze_at_epoch, the backbone's learning rate is the head's times
            this (discriminative learning rates; null means 0.1). Its parameter group exists from the
            start, frozen. Without unfreeze_at_epoch there is no such group: setting it is an error.
        tta_flip: Test-time augmentation in validation, test, predict and exported models: average
            the class probabilities of each image and its mirror image (twice the evaluation work).
        task: multiclass (one class per image: softmax, cross-entropy, accuracy) or multilabel (any
            number per image: a sigmoid per class, BCEWithLogitsLoss, mean average precision); null
            takes the data's (multilabel when a label table gives images several labels).
        threshold: multilabel: the probability at or above which an image gets a class, for every
            class; null picks each class's threshold on the validation set (best F1), each epoch,
            and saves it in the checkpoint.
        head_solver: gradient (the configured optimizer, batch by batch) or lbfgs: with a frozen
            backbone and its features cached, each epoch fits the head on the whole training set
            to convergence by L-BFGS, as an L2-regularised logistic regression (softmax or sigmoid),
            with the strengths of ``lbfgs_l2`` from the strongest to the weakest; the best checkpoint
            by validation is then the best strength (Kornblith et al., 2019; docs/results.md measures
            it). optimizer and scheduler are not used.
        lbfgs_l2: The strongest and weakest L2 strength: ``trainer.max_epochs`` strengths spaced evenly
            in log scale, one per epoch. The loss is the mean over images, so scikit-learn's ``C`` is
            ``1 / (strength * training images)``.
        lbfgs_max_iter: L-BFGS iterations at most per strength.
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
        backbone_lr_scale: float | None = None,
        tta_flip: bool = False,
        task: Task | None = None,
        threshold: float | None = None,
        head_solver: HeadSolver = "gradient",
        lbfgs_l2: tuple[float, float] = (1e-1, 1e-6),
        lbfgs_max_iter: int = 500,
    ) -> None:
        super().__init__()
        if head_solver not in ("gradient", "lbfgs"):
            raise UserInputError(f"head_solver must be gradient or lbfgs, got {head_solver!r}.")
        if head_solver == "lbfgs" and (not freeze_backbone or unfreeze_at_epoch is not None):
            raise UserInputError(
                "head_solver lbfgs fits a linear head on frozen features: set freeze_backbone true "
                "(and no unfreeze_at_epoch), or use head_solver gradient."
            )
        if not (lbfgs_l2[0] >= lbfgs_l2[1] > 0) or lbfgs_max_iter < 1:
            raise UserInputError(
                f"lbfgs_l2 is [strongest, weakest], both > 0 (e.g. [0.1, 1.0e-6]), and lbfgs_max_iter >= 1; "
                f"got {list(lbfgs_l2)} and {lbfgs_max_iter}."
            )
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
        if backbone_lr_scale is not None and unfreeze_at_epoch is None:
            raise UserInputError(
                f"backbone_lr_scale {backbone_lr_scale} scales the backbone's learning rate after gradual "
                "unfreezing, but unfreeze_at_epoch is not set: set both (with freeze_backbone: true), or neither."
            )
        if task not in (None, "multiclass", "multilabel"):
            raise UserInputError(f"task must be multiclass, multilabel or null, got {task!r}.")
        if threshold is not None and task == "multiclass":
            raise UserInputError("model.threshold is the decision threshold of multilabel models; task is multiclass.")
        if threshold is not None and not 0 < threshold < 1:
            raise UserInputError(f"threshold must be a probability between 0 and 1 (e.g. 0.5), got {threshold}.")
        if backbone_lr_scale is not None and backbone_lr_scale <= 0:
            raise UserInputError(f"backbone_lr_scale must be positive, got {backbone_lr_scale}.")
        if trainable_from is not None and freeze_backbone and unfreeze_at_epoch is None:
            raise UserInputError(
                f"trainable_from {trainable_from!r} says where fine-tuning starts, but freeze_backbone: true "
                "trains only the head: set freeze_backbone false, or unfreeze_at_epoch."
            )
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        #: lbfgs: one manual full-batch solve per epoch instead of Lightning's step per batch.
        self.automatic_optimization = head_solver == "gradient"
        #: lbfgs: every training feature and label, on the model's device, during fit.
        self._lbfgs_rows: tuple[Tensor, Tensor] | None = None
        self.network, self.parts = create_network(backbone, weights, num_classes)
        #: Names of the outermost modules before ``trainable_from``: frozen for the whole run, and
        #: of the parameters that enclosing modules hold directly (ViT's class token), frozen with them.
        self.always_frozen = modules_before(self.network, trainable_from) if trainable_from else []
        self.always_frozen_loose = (
            parameters_of_enclosing_modules(self.network, trainable_from) if trainable_from else []
        )
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

        # Losses averaged over images, not over batches: under DDP each process's images count (Lightning's
        # sync_dist averages the processes' means, which differ in weight when the shares are uneven).
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        #: The last test's report and (multiclass) confusion matrix, written out by ClassificationReportFiles.
        self.test_report: tuple[ClassificationReport | MultilabelReport, Tensor | None] | None = None
        self._build_metrics(task or "multiclass")  # a null task is multiclass until the data says otherwise

    def use_task(self, task: Task) -> None:
        """Set ``task``, with its metrics (and for multilabel the decision thresholds); with ``model.task``
        null, the CLI calls this with the data's task once both exist, or :meth:`setup` does."""
        if task == "multiclass" and self.hparams.threshold is not None:
            raise UserInputError(
                "model.threshold is the decision threshold of multilabel models; this one is multiclass."
            )
        self.hparams.task = task  # saved in checkpoints as the resolved task
        self._build_metrics(task)

    def _build_metrics(self, task: Task) -> None:
        num_classes = self.hparams.num_classes
        if task == "multilabel":
            for name in ("train_acc", "val_acc", "test_acc", "test_metrics"):  # those of a null task, if built
                if hasattr(self, name):
                    delattr(self, name)
            self.val_outputs, self.test_outputs = MultilabelOutputs(), MultilabelOutputs()
            #: Each class's decision threshold: picked on validation (or model.threshold), saved in checkpoints.
            self.register_buffer("thresholds", torch.full((num_classes,), self.hparams.threshold or DEFAULT_THRESHOLD))
        else:
            self.train_acc = MulticlassAccuracy(num_classes, average="micro")
            self.val_acc = MulticlassAccuracy(num_classes, average="micro")
            self.test_acc = MulticlassAccuracy(num_classes, average="micro")
            self.test_metrics = ClassificationMetrics(num_classes)

    @property
    def multilabel(self) -> bool:
        return self.hparams.task == "multilabel"

    @property
    def monitor(self) -> str:
        """The validation metric that picks the best checkpoint: val/acc, or val/mAP for multilabel."""
        return MONITORED[self.hparams.task or "multiclass"]

    @property
    def head_name(self) -> str:
        """Dotted name of the new head in :attr:`network` (``fc``, ``classifier.1``)."""
        return self.parts.head

    @property
    def head(self) -> nn.Linear:
        return self.network.get_submodule(self.head_name)

    @property
    def classifier_block(self) -> nn.Module:
        """The top-level part of the network that holds the head (``fc``; ``classifier`` with its dropout)."""
        return self.network.get_submodule(self.parts.classifier_block)

    def freeze_backbone(self) -> None:
        """Set requires_grad False on every parameter outside the head."""
        self.network.requires_grad_(False)
        self.head.requires_grad_(True)
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

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule if self._trainer else None
        self.check_task(getattr(datamodule, "task", "multiclass"))
        input_size = getattr(datamodule, "input_size", None)
        if input_size is not None:
            self.check_input_size(input_size)
        self.loss_weights = getattr(datamodule, "loss_weights", None)
        if self.hparams.channels_last:
            self.network.to(memory_format=torch.channels_last)
        if self.hparams.compile and not self._compiled:
            self.network.compile()  # in place: state_dict keys and checkpoints stay as they are
            self._compiled = True

    def check_task(self, data_task: Task) -> None:
        """Take the data's task when ``task`` is null; refuse multi-label data for a multiclass model."""
        if self.hparams.task is None:
            self.use_task(data_task)
        elif data_task == "multilabel" and not self.multilabel:
            raise UserInputError(
                "The data gives images several labels, but model.task is multiclass (one class per image): "
                "set --model.task multilabel (or leave it unset), or train on single-label data."
            )

    @torch.no_grad()
    def check_input_size(self, size: tuple[int, int]) -> None:
        """Run one blank image of ``size`` through the network, so a size it cannot take fails here, clearly."""
        was_training = self.training
        self.eval()
        try:
            self.network(torch.zeros(1, 3, *size, device=self.device))
        except (RuntimeError, ValueError, AssertionError) as error:
            least = f"at least {self.parts.min_size[0]}x{self.parts.min_size[1]}" if self.parts.min_size else "e.g. 224"
            raise UserInputError(
                f"{self.hparams.backbone} cannot take {size[0]}x{size[1]} images ({error}). "
                f"Set --data.image_size to a size it accepts: {least} (its weights were trained at 224)."
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
        """Class scores for evaluation; with ``tta_flip`` those of the mean probabilities of each image
        and its mirror image (so probabilities, metrics and losses all see the average): the log of the
        mean softmax, or for multilabel the logit of the mean sigmoid."""
        logits = self.logits(inputs)
        if not self.hparams.tta_flip:
            return logits
        mirrored = self.logits(inputs.flip(-1))
        if self.multilabel:  # log(p) - log(1 - p) of p = the mean of the two sigmoids; the halves cancel
            positive = torch.logsumexp(torch.stack([F.logsigmoid(logits), F.logsigmoid(mirrored)]), dim=0)
            negative = torch.logsumexp(torch.stack([F.logsigmoid(-logits), F.logsigmoid(-mirrored)]), dim=0)
            return positive - negative
        both = torch.stack([logits.log_softmax(dim=-1), mirrored.log_softmax(dim=-1)])
        return torch.logsumexp(both, dim=0) - math.log(2)

    def probabilities(self, logits: Tensor) -> Tensor:
        """Class probabilities: softmax (multiclass) or one sigmoid per class (multilabel)."""
        return logits.sigmoid() if self.multilabel else logits.softmax(dim=-1)

    def targets(self, labels: Tensor) -> Tensor:
        """0/1 targets (N, classes) of multi-label labels; class indices become one-hot rows."""
        return labels if labels.ndim == 2 else F.one_hot(labels, self.hparams.num_classes)

    def evaluation_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """The plain loss of validation and test (no smoothing or class weights), per image: comparable
        between runs. Multilabel: the mean over classes of each image's binary cross-entropy."""
        if self.multilabel:
            targets = self.targets(labels).float()
            return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(dim=1)
        return F.cross_entropy(logits, labels, reduction="none")

    def training_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """The training loss: with label smoothing and the class weights of ``data.class_balance: loss``."""
        smoothing = self.hparams.label_smoothing
        if self.multilabel:  # label smoothing of a sigmoid: targets 1 - s/2 and s/2
            targets = self.targets(labels).float() * (1 - smoothing) + smoothing / 2
            return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=self.loss_weights)
        return F.cross_entropy(logits, labels, weight=self.loss_weights, label_smoothing=smoothing)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | dict[str, Tensor | int]:
        if self.hparams.head_solver == "lbfgs":
            return self.lbfgs_step()
        images, labels = batch
        logits = self.logits(images)
        loss = self.training_loss(logits, labels)
        if not self.multilabel:
            self.train_acc(logits, labels)
            self.log("train/acc", self.train_acc, on_step=True, on_epoch=True)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def on_fit_start(self) -> None:
        """lbfgs: check that the batches are cached features, and make each epoch one step (:meth:`lbfgs_step`)."""
        if self.hparams.head_solver != "lbfgs":
            return
        if not self.inputs_are_features:
            raise UserInputError(
                "head_solver lbfgs fits the head on the cached features of the whole training set, but the "
                "frozen-feature cache is off (the log line 'Frozen-feature cache off' says why): enable it, with "
                "data.augment false and tta_flip false."
            )
        if not self.trainer.max_epochs or self.trainer.max_epochs < 1:
            raise UserInputError("head_solver lbfgs tries one L2 strength per epoch: set trainer.max_epochs >= 1.")
        # Lightning's loop would give each epoch one step per batch; the step fits on the whole training set,
        # gathered here once for every epoch.
        self.trainer.limit_train_batches = 1
        features, labels = self.trainer.datamodule.train_set.to_arrays()
        self._lbfgs_rows = features.to(self.device), labels.to(self.device)
        strengths = ", ".join(f"{l2:.3g}" for l2 in self.lbfgs_strengths())
        rank_zero_info(f"L-BFGS head: one full-batch fit per epoch, L2 strengths {strengths}; picked on validation.")

    def on_fit_end(self) -> None:
        self._lbfgs_rows = None  # the training features, for the L-BFGS head's steps only

    def lbfgs_strengths(self) -> list[float]:
        return linear_probe.l2_strengths(*self.hparams.lbfgs_l2, self.trainer.max_epochs)

    def lbfgs_step(self) -> dict[str, Tensor | int]:
        """Fit the head on every cached training feature at this epoch's L2 strength, from the last fit; return
        the loss and how many images that was (for ``train/images_per_sec``)."""
        features, labels = self._lbfgs_rows
        l2 = self.lbfgs_strengths()[self.current_epoch]
        loss, logits, iterations = linear_probe.fit_head(
            self.optimizers(),
            self.classifier_block,
            self.head,
            features,
            labels,
            self.training_loss,
            l2,
            self.manual_backward,
        )
        if not self.multilabel:
            self.train_acc(logits, labels)
            self.log("train/acc", self.train_acc, on_step=True, on_epoch=True)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log_dict({"train/l2": l2, "train/lbfgs_iterations": float(iterations)}, on_step=False, on_epoch=True)
        if iterations >= self.hparams.lbfgs_max_iter:
            rank_zero_info(
                f"L-BFGS head: strength {l2:.3g} stopped at the {iterations}-iteration cap before converging; "
                "raise model.lbfgs_max_iter for a fully converged fit."
            )
        return {"loss": torch.tensor(loss), "images": len(labels)}

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self.evaluation_logits(images)
        self.val_loss.update(self.evaluation_loss(logits, labels))
        self.log("val/loss", self.val_loss, prog_bar=True)
        if self.multilabel:
            self.val_outputs.update(logits.sigmoid(), self.targets(labels))
        else:
            self.val_acc(logits, labels)
            self.log("val/acc", self.val_acc, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        """Multilabel: pick each class's decision threshold on this validation (unless ``threshold`` is
        set; not in Lightning's sanity check), and log mAP, per-class AP and the F1 at those thresholds."""
        if not self.multilabel:
            return
        probabilities, targets = self.val_outputs.compute()  # every process gets the whole split
        self.val_outputs.reset()
        if self.hparams.threshold is None and not (self._trainer is not None and self.trainer.sanity_checking):
            self.thresholds.copy_(pick_thresholds(probabilities, targets))
        f1, micro_f1 = multilabel_f1(probabilities, targets, self.thresholds)
        precisions = average_precisions(probabilities, targets)
        self.log("val/mAP", mean_over_present(precisions), prog_bar=True)
        self.log("val/f1_macro", mean_over_present(f1))
        self.log("val/f1_micro", micro_f1)
        for name, ap in zip(self.class_names, precisions.tolist(), strict=True):
            if not math.isnan(ap):  # a class without validation positives has no AP
                self.log(f"val/AP_{name}", ap)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Update the test metrics; return each image's loss and probabilities (for
        :class:`~transfer_lightning.interpretation.Interpretation`)."""
        images, labels = batch
        logits = self.evaluation_logits(images)
        losses = self.evaluation_loss(logits, labels)
        self.test_loss.update(losses)
        self.log("test/loss", self.test_loss)
        if self.multilabel:
            self.test_outputs.update(logits.sigmoid(), self.targets(labels))
        else:
            self.test_acc(logits, labels)
            self.test_metrics.update(logits, labels)
            self.log("test/acc", self.test_acc)
        return {"losses": losses, "probabilities": self.probabilities(logits)}

    def on_test_epoch_end(self) -> None:
        """Log per-class accuracy (classes with test images only), macro-F1 and top-5, or for multilabel
        mAP, F1 and per-class AP; keep the report (and confusion matrix) in :attr:`test_report` for
        :class:`ClassificationReportFiles`."""
        if self.multilabel:
            probabilities, targets = self.test_outputs.compute()
            self.test_outputs.reset()
            report = multilabel_report(probabilities, targets, self.thresholds, self.class_names)
            self.log("test/mAP", report.mean_average_precision)
            self.log("test/f1_macro", report.macro_f1)
            self.log("test/f1_micro", report.micro_f1)
            for name, ap, present in zip(self.class_names, report.average_precision, report.present, strict=True):
                if present:
                    self.log(f"test/AP_{name}", ap)
            self.test_report = (report, None)
            return
        report, confusion = self.test_metrics.compute(self.class_names)
        self.test_metrics.reset()
        self.log("test/f1_macro", report.macro_f1)
        if report.top_k_accuracy is not None:
            self.log("test/acc_top5", report.top_k_accuracy)
        for name, recall, present in zip(self.class_names, report.recall, report.present, strict=True):
            if present:  # a class without test images has no accuracy, rather than 0%
                self.log(f"test/acc_{name}", recall)
        self.test_report = (report, confusion)

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Class probabilities of each image, with its true label(s) when the data has them."""
        images, labels = batch
        return {"probabilities": self.probabilities(self.evaluation_logits(images)), "labels": labels}

    def configure_optimizers(self) -> Any:
        if self.hparams.head_solver == "lbfgs":
            rank_zero_info("L-BFGS head: model.optimizer and model.scheduler are not used.")
            return linear_probe.make_lbfgs(list(self.head.parameters()), self.hparams.lbfgs_max_iter)
        never_trained = {id(p) for p in self.always_frozen_parameters()}
        split_backbone = self.hparams.unfreeze_at_epoch is not None
        groups = parameter_groups(
            self.network, self.head, never_trained, split_backbone, self.hparams.no_weight_decay_on_norm_and_bias
        )
        scale = self.hparams.backbone_lr_scale or DEFAULT_BACKBONE_LR_SCALE
        optimizer = build_optimizer(self.optimizer_factory, groups, scale if split_backbone else None)
        if self.scheduler_factory is None:
            return optimizer
        interval = self.hparams.scheduler_interval
        scheduler = build_scheduler(self.scheduler_factory, optimizer, interval, self.trainer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": interval, "monitor": "val/loss"},
        }

    def configure_callbacks(self) -> list[pl.Callback]:
        """The frozen part's BatchNorm policy, the test report's files, and gradual unfreezing when
        ``unfreeze_at_epoch`` is set (each once: an earlier fit of this trainer may have attached them)."""
        wanted = [FrozenBatchNorm(), ClassificationReportFiles()]
        if self.hparams.unfreeze_at_epoch is not None:
            wanted.append(GradualUnfreezing(self.hparams.unfreeze_at_epoch))
        attached = {type(c) for c in self.trainer.callbacks} if self._trainer is not None else set()
        return [callback for callback in wanted if type(callback) not in attached]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another backbone or class count with a clear message; when resuming
        ``fit``, also one whose settings made other optimizer parameter groups than this model's."""
        resuming = self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING
        checkpoints.check_compatible(checkpoint.get("hyper_parameters", {}), self.hparams, resuming)
