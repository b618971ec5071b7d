"""Frozen-feature cache: push each image through an unchanging backbone once, not once per epoch."""

from __future__ import annotations

import math
import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from transfer_lightning.data import ImageArrays, ImageFolderDataModule, ImageTensorDataset
from transfer_lightning.logs import progress_bar
from transfer_lightning.model import TransferClassifier


class FrozenFeatureCache(pl.Callback):
    """With a frozen backbone, train and validate the head on features computed once per split.

    The backbone of a :class:`TransferClassifier` with ``freeze_backbone`` (and BatchNorm in eval
    mode) maps an image to the same features in every epoch, so recomputing them is wasted work.
    At the start of ``fit`` this computes the inputs of the model's classifier block (pooled
    features) for the training and validation sets, with a progress bar, and trains only that block
    on them; the test set is still run through the whole network. The cache is skipped, with a log
    line saying why, when random augmentation is on, when BatchNorm statistics are set to drift, or
    when the backbone is trained. Under DDP every process computes the features of the whole set.

    Args:
        enabled: Use the cache when it is valid.
        batch_size: Images per forward pass while computing the features.
    """

    def __init__(self, enabled: bool = True, batch_size: int = 500) -> None:
        self.enabled = enabled
        self.batch_size = batch_size
        self._image_sets: dict[str, ImageTensorDataset] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        datamodule = trainer.datamodule
        reason = self.reason_not_to_cache(pl_module, datamodule)
        if reason:
            if self.enabled and isinstance(pl_module, TransferClassifier) and pl_module.hparams.freeze_backbone:
                rank_zero_info(f"Frozen-feature cache off: {reason}.")
            return
        start = time.perf_counter()
        for split in ("train_set", "val_set"):
            images = getattr(datamodule, split)
            self._image_sets[split] = images
            features = self.compute(pl_module, datamodule, images, split, trainer)
            setattr(datamodule, split, ImageTensorDataset(ImageArrays(features, images.labels)))
        pl_module.inputs_are_features = True
        count = sum(len(images) for images in self._image_sets.values())
        rank_zero_info(
            f"Frozen-feature cache: features of {count} images computed in {time.perf_counter() - start:.1f} s."
        )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put the image sets back: the features belong to this fit's backbone only."""
        for split, images in self._image_sets.items():
            setattr(trainer.datamodule, split, images)
        self._image_sets.clear()
        if isinstance(pl_module, TransferClassifier):
            pl_module.inputs_are_features = False

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.on_fit_end(trainer, pl_module)

    def reason_not_to_cache(self, pl_module: pl.LightningModule, datamodule: object) -> str | None:
        if not self.enabled:
            return "disabled (--feature_cache.enabled false)"
        if not isinstance(pl_module, TransferClassifier) or not isinstance(datamodule, ImageFolderDataModule):
            return "it needs a TransferClassifier and an ImageFolderDataModule"
        if not pl_module.hparams.freeze_backbone:
            return "the backbone is trained"
        if pl_module.hparams.update_bn_stats:
            return "update_bn_stats lets the backbone's BatchNorm statistics change every step"
        if datamodule.hparams.augment:
            return "random augmentation changes the images every epoch"
        return None

    def compute(
        self,
        model: TransferClassifier,
        datamodule: ImageFolderDataModule,
        images: ImageTensorDataset,
        split: str,
        trainer: pl.Trainer,
    ) -> torch.Tensor:
        """Classifier-block inputs of the ``images`` of a split, in eval mode, under the trainer's precision."""
        was_training = model.training
        model.eval()
        chunks = (chunk for chunk, _ in images.batches(self.batch_size))
        total = math.ceil(len(images) / self.batch_size)
        features = []
        with trainer.precision_plugin.forward_context():
            description = f"Caching frozen features ({split})"
            for chunk in progress_bar(chunks, total=total, desc=description, disable=not trainer.is_global_zero):
                batch = datamodule.batch_transform(chunk.to(model.device, non_blocking=True), train=False)
                features.append(model.classifier_inputs(batch).float().cpu())
        model.train(was_training)
        return torch.cat(features)
