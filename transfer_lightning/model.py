"""TransferClassifier: a pretrained torchvision or timm backbone with a new head, fine-tuned or frozen.

The LightningModule reads as network, forward, steps, metrics and optimizers. What it is built from
lives in packages of its own and is asked, not re-decided here: the network and its frozen parts
(:mod:`~transfer_lightning.network`), the kind of labels with its losses, probabilities and metrics
(:mod:`~transfer_lightning.tasks`), the optimizer, schedule and L-BFGS head (:mod:`~transfer_lightning.optim`).
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn
from torchmetrics import MeanMetric

from transfer_lightning import checkpoints
from transfer_lightning.data import ImageFolderDataModule
from transfer_lightning.data.transforms import WeightsPreprocessing
from transfer_lightning.model_settings import check_model_settings
from transfer_lightning.network import FrozenBatchNorm, FrozenParts, GradualUnfreezing, check_input_size, create_network
from transfer_lightning.network.heads import HeadName
from transfer_lightning.network.timm_backbones import layer_decay_scales
from transfer_lightning.optim import LBFGSHead, optimization, parameter_groups
from transfer_lightning.tasks import KNOWN_RATE, Task, TaskName, TestReport, create_task, task_for_data
from transfer_lightning.tasks.report_files import ClassificationReportFiles

#: The backbone's learning rate relative to the head's after gradual unfreezing, unless set.
DEFAULT_BACKBONE_LR_SCALE = 0.1
HeadSolver = Literal["gradient", "lbfgs"]


class TransferClassifier(pl.LightningModule):
    """A pretrained classifier (torchvision's or timm's) whose last Linear layer is replaced for the task.

    Args:
        backbone: torchvision model name (resnet18, mobilenet_v2, ...), timm/NAME[.TAG] (timm/convnext_tiny.fb_in22k),
            hf-hub:ORG/NAME[@REVISION], or local-dir:PATH (a timm folder: config.json, model.safetensors).
        weights: DEFAULT (the backbone's own: torchvision's, the Hub's, the folder's), a torchvision weights name
            (IMAGENET1K_V1), a local state_dict or .safetensors file, or null for random initialisation.
        num_classes: Outputs of the new head; linked from the datamodule by the CLI.
        class_names: Names of the classes, for per-class test metrics; linked from the datamodule.
        head: linear (one Linear layer) or mlp (fastai's: average and max pooling, BatchNorm, dropout, a hidden layer of
            512): more accurate on frozen features (docs/results.md), still trained on the feature cache.
        stage_features: Modules whose pooled outputs join the head's input (features.6; network.stage_features).
        freeze_backbone: Train only the new head (fixed feature extractor); the backbone's BatchNorm stays in eval mode.
        adapt_bn_stats: With freeze_backbone, recompute the backbone's BatchNorm statistics once on the training images
            when fit starts (before features are cached), then keep them frozen: statistics of your data.
        update_bn_stats: With freeze_backbone, let BatchNorm statistics drift in training (the reference loop did).
        channels_last: Channels-last memory format, in which oneDNN and cuDNN run convolutions faster (measured).
        compile: torch.compile the network before training (slow start, faster steps on GPU).
        optimizer: Optimizer class and arguments (class_path: torch.optim.SGD, ...), for the trainable parameters.
        scheduler: Learning-rate scheduler; null keeps the rate constant. A scheduler that takes ``total_steps``
            (OneCycleLR, :class:`~transfer_lightning.optim.WarmupCosineLR`) gets the whole run's count when the config
            leaves it unset.
        scheduler_interval: Step the scheduler (and log the rate) per ``epoch`` (reference) or ``step`` (warmup).
        label_smoothing: Label smoothing of the training loss (0.1 is common); evaluation losses stay plain.
        no_weight_decay_on_norm_and_bias: Exempt normalisation layers and biases from weight decay, as recipes do.
        trainable_from: Partial fine-tuning from this module on (dotted name: ``features.7`` of mobilenet_v2, ``layer3``
            of resnet18). The modules before it stay frozen, BatchNorm folded into their convolutions
            (docs/performance.md measures it), with the parameters that enclosing modules hold directly (ViT's class
            token).
        unfreeze_at_epoch: With freeze_backbone, train the network (from trainable_from on) from this epoch (from 0) on.
        backbone_lr_scale: With unfreeze_at_epoch, the backbone's learning rate is the head's times this (null: 0.1).
        tta_flip: In evaluation, predict and exports, average each image's and its mirror's probabilities (2x work).
        task: multiclass (one class per image: softmax, accuracy) or multilabel (any number: a sigmoid per class, mAP);
            null takes the data's (:mod:`~transfer_lightning.tasks`).
        data_task: The data's task, linked from ``data.task`` by the CLI (a plain Trainer: pass ``data.task``).
        threshold: multilabel: the probability at or above which an image gets a class; null picks each class's
            threshold on validation (best F1), saved in the checkpoint.
        calibrate: multiclass: fit a temperature on each validation that divides the logits, so that the probabilities
            are calibrated (the top class is unchanged); false keeps the softmax as it is.
        known_rate: multiclass: the share of validation images that "none of these" keeps: each validation sets the
            unknown score's threshold to it; predict, serve and exports answer ``unknown`` above it. null: never.
        head_solver: gradient (the optimizer, batch by batch) or lbfgs: on cached frozen features, each epoch fits the
            head to convergence by full-batch L-BFGS at the next strength of ``lbfgs_l2``, so the best checkpoint is the
            best strength (:class:`~transfer_lightning.optim.LBFGSHead`).
        lbfgs_l2: The strongest and weakest L2 strength, ``trainer.max_epochs`` of them log-spaced; the loss is the mean
            over images, so scikit-learn's ``C`` is ``1 / (strength * training images)``.
        lbfgs_max_iter: L-BFGS iterations at most per strength.
        backbone_image_size: timm ViTs: the side their position embeddings take (518 -> 224); set data.image_size alike.
        layer_decay: timm backbones: layer-wise learning-rate decay (0.75: each layer's rate is the next one's times
            0.75, by timm's group_matcher); null: one rate.
        gradient_checkpointing: timm backbones: recompute activations in the backward pass: less memory, ~1/3 more time.
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        weights: str | None = "DEFAULT",
        num_classes: int = 10,
        class_names: list[str] | None = None,
        head: HeadName = "linear",
        stage_features: list[str] | None = None,
        freeze_backbone: bool = False,
        adapt_bn_stats: bool = False,
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
        task: TaskName | None = None,
        data_task: TaskName | None = None,
        threshold: float | None = None,
        calibrate: bool = True,
        known_rate: float | None = KNOWN_RATE,
        head_solver: HeadSolver = "gradient",
        lbfgs_l2: tuple[float, float] = (1e-1, 1e-6),
        lbfgs_max_iter: int = 500,
        backbone_image_size: int | None = None,
        layer_decay: float | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        check_model_settings(locals())
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "data_task"])
        # The task, resolved once before anything is built; saved in checkpoints as resolved.
        self.hparams.task = task_for_data(task, threshold, data_task or task or "multiclass")
        #: lbfgs: the head fitted by full-batch L-BFGS, one strength per epoch, by hand (manual optimization).
        self.head_fitter = LBFGSHead(*lbfgs_l2, lbfgs_max_iter) if head_solver == "lbfgs" else None
        self.automatic_optimization = self.head_fitter is None
        self.network, self.parts = create_network(
            backbone, weights, num_classes, backbone_image_size, gradient_checkpointing, head, stage_features
        )
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.frozen = FrozenParts(self.network, self.parts.head, trainable_from, freeze_backbone)
        #: Set by :class:`~transfer_lightning.training.FrozenFeatureCache` while batches are cached features.
        self.inputs_are_features = False
        self._compiled = False
        #: Per-class weights of the training loss (``data.class_balance: loss``), set in :meth:`setup`.
        self.register_buffer("loss_weights", None, persistent=False)
        # Losses averaged over images, not batches: under DDP Lightning's sync_dist averages unequal processes' means.
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        #: The last test's report, written out by ClassificationReportFiles.
        self.test_report: TestReport | None = None
        names = class_names or [str(i) for i in range(num_classes)]
        self.task: Task = create_task(self.hparams.task, names, threshold, calibrate, known_rate)
        self.metrics = self.task.metrics()

    @property
    def class_names(self) -> list[str]:
        return self.task.class_names

    @property
    def weights_preprocessing(self) -> WeightsPreprocessing:
        """What the backbone's weights expect of their input: ``data.normalization auto`` asks for it."""
        return self.parts.preprocessing

    @property
    def head(self) -> nn.Module:
        """The new head (``fc``, ``classifier.1``; mlp: the classifier block), with ``in_features`` as a Linear's."""
        return self.network.get_submodule(self.parts.head)

    @property
    def classifier_block(self) -> nn.Module:
        """The part of the network that holds the head and gets the pooled features (``fc``; ``classifier``)."""
        return self.network.get_submodule(self.parts.classifier_block)

    def train(self, mode: bool = True) -> TransferClassifier:
        """Switch modes as usual, but keep the BatchNorm layers of frozen modules in eval mode."""
        super().train(mode)
        if mode and not self.hparams.update_bn_stats:
            for batchnorm in self.frozen.batchnorms():
                batchnorm.eval()
        return self

    def setup(self, stage: str) -> None:
        data = self.trainer.datamodule if self._trainer else None
        if isinstance(data, ImageFolderDataModule):  # the data's facts, once its setup ran; others have none
            if data.task is not None:
                task_for_data(self.task.name, self.hparams.threshold, data.task)  # multi-label data, multiclass model
            if data.input_size is not None:
                check_input_size(self.network, data.input_size, self.hparams.backbone, self.parts.min_size)
            self.loss_weights = data.loss_weights
        if self.hparams.channels_last:
            self.network.to(memory_format=torch.channels_last)
        if self.hparams.compile and not self._compiled:
            self.network.compile()  # in place: state_dict keys and checkpoints stay as they are
            self._compiled = True

    def forward(self, images: Tensor) -> Tensor:
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.network(images)

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

    def logits(self, inputs: Tensor) -> Tensor:
        """Class scores for a batch of images, or of cached features (see :attr:`inputs_are_features`)."""
        return self.classifier_block(inputs) if self.inputs_are_features else self(inputs)

    def evaluation_logits(self, inputs: Tensor) -> Tensor:
        """Class scores for evaluation; with ``tta_flip`` those of the task's mean of each image and its mirror."""
        logits = self.logits(inputs)
        return self.task.flip_average(logits, self.logits(inputs.flip(-1))) if self.hparams.tta_flip else logits

    def training_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """The task's training loss, with label smoothing and the class weights of ``data.class_balance: loss``."""
        return self.task.training_loss(logits, labels, self.hparams.label_smoothing, self.loss_weights)

    def log_training(self, logits: Tensor, labels: Tensor, loss: Tensor) -> None:
        """Log the training loss and the task's training metrics, per step and per epoch."""
        for name, metric in self.metrics.training_update(logits, labels).items():
            self.log(name, metric, on_step=True, on_epoch=True)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | dict[str, Tensor | int]:
        if self.head_fitter is not None:
            return self.head_fitter.step(self)
        images, labels = batch
        logits = self.logits(images)
        loss = self.training_loss(logits, labels)
        self.log_training(logits, labels, loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self.evaluation_logits(images)
        self.val_loss.update(self.task.evaluation_loss(logits, labels))
        self.log("val/loss", self.val_loss, prog_bar=True)
        for name, metric in self.metrics.update("val", logits, labels).items():
            self.log(name, metric, prog_bar=name == self.task.monitor)

    def on_validation_epoch_end(self) -> None:
        sanity_checking = self._trainer is not None and self.trainer.sanity_checking
        for name, value in self.metrics.validation_end(self.task, sanity_checking).items():
            self.log(name, value, prog_bar=name == self.task.monitor)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Update the test metrics; return each image's loss and probabilities (for ``Interpretation``)."""
        images, labels = batch
        logits = self.evaluation_logits(images)
        losses = self.task.evaluation_loss(logits, labels)
        self.test_loss.update(losses)
        self.log("test/loss", self.test_loss)
        self.log_dict(self.metrics.update("test", logits, labels))
        return {"losses": losses, "probabilities": self.task.probabilities(logits)}

    def on_test_epoch_end(self) -> None:
        """Log the task's test scores; keep its report in :attr:`test_report` for ClassificationReportFiles."""
        self.test_report = self.metrics.test_end(self.task)
        self.log_dict(self.test_report.scalars())

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Each image's probabilities, true label(s) when the data has them, and unknown score when the task has one."""
        logits, scores = self.evaluation_logits(batch[0]), {}
        if self.task.answers_unknown:
            scores = {"unknown_scores": self.task.unknown_scores(logits)}
        return {"probabilities": self.task.probabilities(logits), "labels": batch[1], **scores}

    def configure_optimizers(self) -> Any:
        if self.head_fitter is not None:
            return self.head_fitter.optimizer(self)
        never_trained = {id(p) for p in self.frozen.always_frozen_parameters()}
        split_backbone = self.hparams.unfreeze_at_epoch is not None
        lr_scales = layer_decay_scales(self.network, self.hparams.layer_decay) if self.hparams.layer_decay else None
        no_decay = self.hparams.no_weight_decay_on_norm_and_bias
        groups = parameter_groups(self.network, self.head, never_trained, split_backbone, no_decay, lr_scales)
        scale = (self.hparams.backbone_lr_scale or DEFAULT_BACKBONE_LR_SCALE) if split_backbone else None
        interval = self.hparams.scheduler_interval
        return optimization(self.optimizer_factory, self.scheduler_factory, groups, scale, interval, self._trainer)

    def configure_callbacks(self) -> list[pl.Callback]:
        """The frozen part's BatchNorm policy, the test report's files, gradual unfreezing (``unfreeze_at_epoch``)
        and the L-BFGS head, each once (an earlier fit of this trainer may have attached them)."""
        wanted = [FrozenBatchNorm(), ClassificationReportFiles()]
        if self.hparams.unfreeze_at_epoch is not None:
            wanted.append(GradualUnfreezing(self.hparams.unfreeze_at_epoch))
        attached = self.trainer.callbacks if self._trainer is not None else []
        wanted = [c for c in wanted if not any(type(a) is type(c) for a in attached)]
        if self.head_fitter is not None and not any(a is self.head_fitter for a in attached):
            wanted.append(self.head_fitter)
        return wanted

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another backbone, class count or task with a clear message (when resuming
        ``fit``, also one whose settings made other optimizer parameter groups), and read older ones."""
        resuming = self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING
        checkpoints.check_compatible(checkpoint.get("hyper_parameters", {}), self.hparams, resuming)
        checkpoints.upgrade_state_dict(checkpoint["state_dict"])
