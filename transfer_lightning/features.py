"""Frozen-feature cache: push each image through an unchanging backbone once, and keep the result on disk."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from transfer_lightning.data import ImageArrays, ImageFolderDataModule, ImageTensorDataset
from transfer_lightning.errors import UserInputError
from transfer_lightning.files import atomic_path
from transfer_lightning.logs import progress_bar
from transfer_lightning.model import TransferClassifier

FeaturePrecision = Literal["trainer", "bf16", "fp32"]


class FrozenFeatureCache(pl.Callback):
    """With a frozen backbone, train and validate the head on features computed once per split.

    The backbone of a :class:`TransferClassifier` with ``freeze_backbone`` (and BatchNorm in eval
    mode) maps an image to the same features in every epoch, so recomputing them is wasted work.
    At the start of ``fit`` this computes the inputs of the model's classifier block (pooled
    features) for the training and validation sets, with a progress bar, and trains only that block
    on them; the test set is still run through the whole network. The cache is skipped, with a
    log line saying why, when random augmentation is on, when BatchNorm statistics are set to
    drift, or when the backbone is trained. Under DDP every process computes the features of the
    whole set.

    With ``store``, features are saved under ``cache_dir`` in a file named by a hash of the
    backbone's weights (every tensor), the images (their store or files, and which rows form the
    split), the input transform and the precision. A later run that changes only the head, its
    optimizer, learning rate or epochs finds the file and skips the backbone (the log says so); a
    change to any of those inputs gives a new file.

    Args:
        enabled: Use the cache when it is valid.
        batch_size: Images per forward pass while computing the features.
        precision: trainer (the trainer's precision), bf16 (bfloat16 autocast: 1.6-2.2x faster on
            this project's CPU, see docs/performance.md) or fp32.
        store: Keep features on disk and reuse them.
        cache_dir: Where stored features go; default: the data module's cache_dir/features.
    """

    def __init__(
        self,
        enabled: bool = True,
        batch_size: int = 500,
        precision: FeaturePrecision = "trainer",
        store: bool = True,
        cache_dir: str | None = None,
    ) -> None:
        if precision not in ("trainer", "bf16", "fp32"):
            raise UserInputError(f"feature_cache.precision must be trainer, bf16 or fp32, got {precision!r}.")
        self.enabled = enabled
        self.batch_size = batch_size
        self.precision = precision
        self.store = store
        self.cache_dir = cache_dir
        self._image_sets: dict[str, ImageTensorDataset] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        datamodule = trainer.datamodule
        reason = self.reason_not_to_cache(pl_module, datamodule)
        if reason:
            if self.enabled and isinstance(pl_module, TransferClassifier) and pl_module.hparams.freeze_backbone:
                rank_zero_info(f"Frozen-feature cache off: {reason}.")
            return
        self._use_features(trainer, pl_module, ("train_set", "val_set"))

    def _use_features(self, trainer: pl.Trainer, model: TransferClassifier, splits: tuple[str, ...]) -> None:
        """Replace the data module's image sets of ``splits`` by their features, stored or computed now."""
        datamodule = trainer.datamodule
        start = time.perf_counter()
        for split in splits:
            images = getattr(datamodule, split)
            self._image_sets[split] = images
            features = self.features(model, datamodule, images, split, trainer)
            setattr(datamodule, split, ImageTensorDataset(ImageArrays(features, images.labels)))
        model.inputs_are_features = True
        count = sum(len(self._image_sets[split]) for split in splits)
        elapsed = time.perf_counter() - start
        rank_zero_info(f"Frozen-feature cache: features of {count} images ready in {elapsed:.1f} s.")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put the image sets back: the features belong to this backbone only."""
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
        if pl_module.hparams.tta_flip:
            return "tta_flip mirrors the validation images, not their features"
        if pl_module.hparams.unfreeze_at_epoch is not None:
            return f"the backbone is unfrozen at epoch {pl_module.hparams.unfreeze_at_epoch}"
        if pl_module.hparams.update_bn_stats:
            return "update_bn_stats lets the backbone's BatchNorm statistics change every step"
        if datamodule.hparams.augment:
            return "random augmentation changes the images every epoch"
        return None

    def features(
        self,
        model: TransferClassifier,
        datamodule: ImageFolderDataModule,
        images: ImageTensorDataset,
        split: str,
        trainer: pl.Trainer,
    ) -> torch.Tensor:
        """The features of ``images``: from the store when a file for exactly these inputs exists."""
        path = self.stored_path(model, datamodule, images, trainer) if self.store else None
        if path is not None and path.is_file():
            rank_zero_info(f"Frozen-feature cache: reusing the stored features of {split} ({path}).")
            return torch.load(path, map_location="cpu", weights_only=True)["features"]
        features = self.compute(model, datamodule, images, split, trainer)
        if path is not None and trainer.is_global_zero:
            with atomic_path(path) as partial:
                torch.save({"features": features}, partial)
            rank_zero_info(f"Frozen-feature cache: stored the features of {split} in {path}.")
        return features

    def stored_path(
        self, model: TransferClassifier, datamodule: ImageFolderDataModule, images: ImageTensorDataset, trainer
    ) -> Path | None:
        """The file of these features; ``None`` for images of unnamed origin (made in memory)."""
        data = images.fingerprint()
        if data is None:
            return None
        digest = hashlib.sha256(data.encode())
        inputs = {
            "backbone": model.hparams.backbone,
            "channels_last": model.hparams.channels_last,
            "preprocessing": datamodule.preprocessing.to_dict(),
            "precision": self._precision_name(trainer),
        }
        digest.update(json.dumps(inputs, sort_keys=True).encode())
        block = model.head_name.split(".")[0] + "."
        for name, tensor in sorted(model.network.state_dict().items()):
            if not name.startswith(block):
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        root = Path(self.cache_dir).expanduser() if self.cache_dir else datamodule.cache_dir / "features"
        return root / f"{model.hparams.backbone}-{digest.hexdigest()[:20]}.pt"

    def _precision_name(self, trainer: pl.Trainer) -> str:
        return f"trainer {trainer.precision}" if self.precision == "trainer" else self.precision

    def _precision_context(self, trainer: pl.Trainer, device: torch.device) -> contextlib.AbstractContextManager:
        if self.precision == "trainer":
            return trainer.precision_plugin.forward_context()
        if self.precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def compute(
        self,
        model: TransferClassifier,
        datamodule: ImageFolderDataModule,
        images: ImageTensorDataset,
        split: str,
        trainer: pl.Trainer,
    ) -> torch.Tensor:
        """Classifier-block inputs of the ``images`` of a split, in eval mode, in :attr:`precision`."""
        was_training = model.training
        model.eval()
        chunks = (chunk for chunk, _ in images.batches(self.batch_size))
        total = math.ceil(len(images) / self.batch_size)
        features = []
        with self._precision_context(trainer, model.device):
            description = f"Caching frozen features ({split})"
            for chunk in progress_bar(chunks, total=total, desc=description, disable=not trainer.is_global_zero):
                batch = datamodule.batch_transform(chunk.to(model.device, non_blocking=True), train=False)
                features.append(model.classifier_inputs(batch).float().cpu())
        model.train(was_training)
        return torch.cat(features)
