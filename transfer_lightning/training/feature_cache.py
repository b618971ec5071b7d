"""Frozen-feature cache: push each image through an unchanging backbone once, and keep the result on disk."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import pickle
import time
import zipfile
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from transfer_lightning.data import ImageArrays, ImageFolderDataModule, ImageTensorDataset
from transfer_lightning.data.streaming import StreamShare
from transfer_lightning.errors import UserInputError
from transfer_lightning.files import check_free_space, remove_leftovers, write_torch_file
from transfer_lightning.logs import progress_bar
from transfer_lightning.model import TransferClassifier
from transfer_lightning.network.onnx import OnnxFeatureExtractor, missing_onnx_packages

FeaturePrecision = Literal["trainer", "bf16", "fp32"]
FeatureEngine = Literal["torch", "onnxruntime", "auto"]
#: Largest difference between onnxruntime's and torch's features, relative to the largest feature.
ONNX_TOLERANCE = 1e-4


class FrozenFeatureCache(pl.Callback):
    """With a frozen backbone, train and validate the head on features computed once per split.

    The backbone of a :class:`TransferClassifier` with ``freeze_backbone`` (and BatchNorm in eval
    mode) maps an image to the same features in every epoch, so recomputing them is wasted work.
    At the start of ``fit`` this computes the inputs of the model's classifier block (pooled
    features) for the training and validation sets, with a progress bar, and trains only that block
    on them; ``test`` does the same for the test set. The cache is skipped, with a log line saying
    why, when the backbone is trained (or unfrozen later), with flip TTA, and in training when
    random augmentation is on or BatchNorm statistics are set to drift.
    Under DDP every process computes the features of the whole set; of an optimized data set streamed
    (``data.streaming_dir``), each process computes its share and the shares are gathered; the test split
    of a stream is tested on its images.

    With ``store``, features are saved under ``cache_dir`` in a file named by a hash of the
    backbone's weights (every tensor), the images (their store or files, and which rows form the
    split), the input transform, the precision and the engine. A later run that changes only the
    head, its optimizer, learning rate or epochs finds the file and skips the backbone (the log
    says so); a change to any of those inputs gives a new file.

    Args:
        enabled: Use the cache when it is valid.
        batch_size: Images per forward pass while computing the features.
        precision: trainer (the trainer's precision), bf16 (bfloat16 autocast; 7x slower on CPUs
            without bf16 instructions, see docs/performance.md) or fp32.
        engine: torch, onnxruntime (the backbone exported to ONNX and run by onnxruntime on the
            CPU in fp32: faster than torch on CPUs, see docs/performance.md; needs the [export] extra),
            or auto (onnxruntime when the model is on the CPU, the precision is fp32 and the
            extra is installed; else torch).
        store: Keep features on disk and reuse them.
        cache_dir: Where stored features go; default: the data module's cache_dir/features.
        train_flips: Also compute the features of each training image's mirror image and train on
            both, as extra rows: a fixed flip augmentation, for twice the training set's feature time
            (docs/results.md measures it). Validation and test stay unflipped.
    """

    def __init__(
        self,
        enabled: bool = True,
        batch_size: int = 500,
        precision: FeaturePrecision = "trainer",
        store: bool = True,
        cache_dir: str | None = None,
        engine: FeatureEngine = "torch",
        train_flips: bool = False,
    ) -> None:
        if precision not in ("trainer", "bf16", "fp32"):
            raise UserInputError(f"feature_cache.precision must be trainer, bf16 or fp32, got {precision!r}.")
        if engine not in ("torch", "onnxruntime", "auto"):
            raise UserInputError(f"feature_cache.engine must be torch, onnxruntime or auto, got {engine!r}.")
        if engine == "onnxruntime" and missing_onnx_packages():
            raise UserInputError(
                f"feature_cache.engine onnxruntime needs {', '.join(missing_onnx_packages())}: install the export "
                "extra (pip install -e '.[export]'), or use --feature_cache.engine torch."
            )
        self.enabled = enabled
        self.batch_size = batch_size
        self.precision = precision
        self.store = store
        self.cache_dir = cache_dir
        self.engine = engine
        self.train_flips = train_flips
        self._image_sets: dict[str, ImageTensorDataset] = {}
        self._test_arrays: tuple[ImageTensorDataset, ImageArrays, Tensor | None] | None = None
        #: The onnxruntime engine's exported backbone, with the digest of the weights and input shape it is for.
        self._onnx: tuple[str, OnnxFeatureExtractor] | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._usable(pl_module, trainer.datamodule, training=True):
            self._use_features(trainer, pl_module, ("train_set", "val_set"))

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Test on features too. The test loop built its DataLoader before this hook, so the features
        go into the dataset object that loader holds; :meth:`on_test_end` puts the images back."""
        if not self._usable(pl_module, trainer.datamodule, training=False):
            return
        images = trainer.datamodule.test_set
        if not isinstance(images, ImageTensorDataset):  # its StreamingDataLoader is built: it streams images
            rank_zero_info("Frozen-feature cache: the test split streams, so it is tested on its images.")
            return
        start = time.perf_counter()
        features, _ = self.features(pl_module, trainer.datamodule, images, "test", trainer)
        self._test_arrays = (images, images.arrays, images.indices)
        images.arrays, images.indices = ImageArrays(features, images.labels), None
        pl_module.inputs_are_features = True
        elapsed = time.perf_counter() - start
        rank_zero_info(f"Frozen-feature cache: features of {len(images)} test images ready in {elapsed:.1f} s.")

    def _usable(self, pl_module: pl.LightningModule, datamodule: object, training: bool) -> bool:
        reason = self.reason_not_to_cache(pl_module, datamodule, training)
        if reason and self.enabled and isinstance(pl_module, TransferClassifier) and pl_module.hparams.freeze_backbone:
            rank_zero_info(f"Frozen-feature cache off: {reason}.")
        return reason is None

    def _use_features(self, trainer: pl.Trainer, model: TransferClassifier, splits: tuple[str, ...]) -> None:
        """Replace the data module's image sets of ``splits`` by their features, stored or computed now."""
        datamodule = trainer.datamodule
        start, count = time.perf_counter(), 0
        for split in splits:
            images = self._image_sets[split] = getattr(datamodule, split)
            if not isinstance(images, ImageTensorDataset):  # a stream: each rank reads its share, then they join
                images = datamodule.source.share(split.removesuffix("_set"), 0, datamodule.hparams.num_workers)
            features, labels = self.features(model, datamodule, images, split, trainer)
            count += len(labels)
            if split == "train_set" and self.train_flips:
                mirrored, _ = self.features(model, datamodule, images, "train, mirrored", trainer, mirrored=True)
                features, labels = torch.cat([features, mirrored]), torch.cat([labels, labels])
                rank_zero_info(f"Frozen-feature cache: {len(images)} mirrored training images added as rows.")
            setattr(datamodule, split, ImageTensorDataset(ImageArrays(features, labels)))
        # A per-step scheduler's length (trainer.estimated_stepping_batches, in configure_optimizers) built the fit
        # loop's loader of training images already: it must be built again, of features. No public API does this.
        trainer.fit_loop._combined_loader = None
        model.inputs_are_features = True
        elapsed = time.perf_counter() - start
        rank_zero_info(f"Frozen-feature cache: features of {count} images ready in {elapsed:.1f} s.")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put the image sets back: the features belong to this backbone only."""
        for split, images in self._image_sets.items():
            setattr(trainer.datamodule, split, images)
        self._image_sets.clear()
        self.on_test_end(trainer, pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._test_arrays is not None:
            images, arrays, indices = self._test_arrays
            images.arrays, images.indices = arrays, indices
            self._test_arrays = None
        if isinstance(pl_module, TransferClassifier):
            pl_module.inputs_are_features = False

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.on_fit_end(trainer, pl_module)

    def reason_not_to_cache(
        self, pl_module: pl.LightningModule, datamodule: object, training: bool = True
    ) -> str | None:
        """Why features cannot stand in for the images (``None`` when they can); ``training`` for fit."""
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
        if training and pl_module.hparams.update_bn_stats:
            return "update_bn_stats lets the backbone's BatchNorm statistics change every step"
        if training and datamodule.hparams.augment:
            return "random augmentation changes the images every epoch"
        return None

    def features(
        self,
        model: TransferClassifier,
        datamodule: ImageFolderDataModule,
        images: ImageTensorDataset | StreamShare,
        split: str,
        trainer: pl.Trainer,
        mirrored: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """The features of ``images`` (or of their mirror images) and their labels: from the store when a file
        for exactly these inputs exists and is whole (a damaged one is computed again, said in one line). Of a
        stream, each rank computes its share and the shares are gathered (:class:`StreamShare`)."""
        path = self.stored_path(model, datamodule, images, trainer, mirrored) if self.store else None
        if path is not None and path.is_file():
            stored = read_stored_features(path, len(images))
            if isinstance(stored, tuple):
                rank_zero_info(f"Frozen-feature cache: reusing the stored features of {split} ({path}).")
                # The images' own labels (--data.relabel changes them, not the features); a stream's, as gathered.
                local = isinstance(images, ImageTensorDataset) or stored[1] is None
                return stored[0], images.labels if local else stored[1]
            rank_zero_info(f"Frozen-feature cache: {path} is damaged ({stored}); computing the features again.")
        if path is not None and trainer.is_global_zero:  # before the backbone's work, not after it
            remove_leftovers(path.parent)
            needed = len(images) * model.head.in_features * 4 + 2**20  # float32 features of the head's input
            what = f"The frozen features of {split}"
            check_free_space(path.parent, needed, what, "--feature_cache.cache_dir (or --feature_cache.store false)")
        features, labels = self.compute(model, datamodule, images, split, trainer, mirrored), images.labels
        if isinstance(images, StreamShare):
            features, labels = images.gather(features, trainer.strategy)
        if path is not None and trainer.is_global_zero:
            try:
                write_torch_file({"features": features, "labels": labels}, path)
            except OSError as error:
                if error.errno != errno.ENOSPC:
                    raise
                raise UserInputError(
                    f"The disk filled while storing {what} in {path.parent}. Free some space, or use "
                    "--feature_cache.cache_dir on another disk; nothing of it was left behind."
                ) from None
            rank_zero_info(f"Frozen-feature cache: stored the features of {split} in {path}.")
        return features, labels

    def stored_path(
        self,
        model: TransferClassifier,
        datamodule: ImageFolderDataModule,
        images: ImageTensorDataset,
        trainer: pl.Trainer,
        mirrored: bool = False,
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
            "engine": self._engine(model, trainer),
        }
        if mirrored:  # only then, so that the files of unflipped features keep their names
            inputs["mirrored"] = True
        if model.hparams.head == "mlp":  # the pooling has no weights to hash; the linear head's files keep their names
            inputs["pooling"] = "avg+max"
        if model.hparams.get("stage_features"):  # their pooled outputs are part of each row
            inputs["stage_features"] = list(model.hparams.stage_features)
        digest.update(json.dumps(inputs, sort_keys=True).encode())
        digest.update(backbone_digest(model).encode())
        root = Path(self.cache_dir).expanduser() if self.cache_dir else datamodule.cache_dir / "features"
        name = Path(model.hparams.backbone.replace(":", "/")).name  # timm/NAME, local-dir:PATH: the last part
        return root / f"{name}-{digest.hexdigest()[:20]}.pt"

    def _precision_name(self, trainer: pl.Trainer) -> str:
        return f"trainer {trainer.precision}" if self.precision == "trainer" else self.precision

    def _engine(self, model: TransferClassifier, trainer: pl.Trainer) -> Literal["torch", "onnxruntime"]:
        """The engine that computes the features: ``auto`` resolved, explicit choices checked."""
        fp32 = self.precision == "fp32" or (self.precision == "trainer" and trainer.precision in ("32-true", "32"))
        if self.engine == "torch":
            return "torch"
        if self.engine == "onnxruntime":
            if not fp32:
                raise UserInputError(
                    "feature_cache.engine onnxruntime computes in fp32: set --feature_cache.precision fp32."
                )
            return "onnxruntime"
        return "onnxruntime" if fp32 and model.device.type == "cpu" and not missing_onnx_packages() else "torch"

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
        mirrored: bool = False,
    ) -> torch.Tensor:
        """Classifier-block inputs of the ``images`` of a split (or of their mirror images), in eval mode, by
        the chosen engine and precision."""
        was_training = model.training
        model.eval()
        chunks = (chunk for chunk, _ in images.batches(self.batch_size))
        total = math.ceil(len(images) / self.batch_size)
        engine = self._engine(model, trainer)
        # One tensor filled in place: a list of small per-batch results, kept while large batches come and
        # go, fragments glibc's heap so badly that memory grew by a batch of images per batch (20 GB at 192 px).
        features, start, extractor = None, 0, model.classifier_inputs
        with self._precision_context(trainer, model.device) if engine == "torch" else contextlib.nullcontext():
            description = f"Caching frozen features ({split}, {engine})"
            for chunk in progress_bar(chunks, total=total, desc=description, disable=not trainer.is_global_zero):
                batch = datamodule.batch_transform(chunk.to(model.device, non_blocking=True), train=False)
                if mirrored:
                    batch = batch.flip(-1)
                if engine == "onnxruntime" and features is None:  # the export needs an example batch
                    extractor = self._onnx_extractor(model, batch)
                output = extractor(batch)
                if features is None:
                    features = torch.empty(len(images), *output.shape[1:])
                features[start : start + len(output)] = output
                start += len(output)
        model.train(was_training)
        if features is None:  # a stream's share can be empty: LitData gave a small split's chunks to other ranks
            return torch.empty(0, model.head.in_features)
        return features[:start]  # a stream's share holds fewer rows than the whole split

    def release_engine(self) -> None:
        """Let the onnxruntime engine go (its session holds the exported backbone and its buffers) when no more
        features will be computed: ``audit`` needs the memory for its own work."""
        self._onnx = None

    def _onnx_extractor(self, model: TransferClassifier, batch: Tensor) -> OnnxFeatureExtractor:
        """The backbone in onnxruntime, checked against torch on the first images of ``batch``.

        Exported once per backbone and input size: ``fit`` and the ``test`` after it share it."""
        key = f"{backbone_digest(model)} {tuple(batch.shape[1:])}"
        if self._onnx is not None and self._onnx[0] == key:
            return self._onnx[1]
        extractor = OnnxFeatureExtractor(model.network, model.parts.classifier_block, batch)
        expected = model.classifier_inputs(batch[:4]).float().cpu()
        difference = float((extractor(batch[:4]) - expected).abs().max())
        if not difference <= ONNX_TOLERANCE * max(1.0, float(expected.abs().max())):
            raise RuntimeError(
                f"onnxruntime's features differ from torch's by {difference:.2e}. This is a bug: please report it "
                "with the backbone name, and use --feature_cache.engine torch meanwhile."
            )
        self._onnx = (key, extractor)
        return extractor


def read_stored_features(path: Path, rows: int) -> tuple[Tensor, Tensor | None] | str:
    """The features stored at ``path`` and their labels (``None`` in older files, which kept none), or why they
    cannot be used: a file cut short or overwritten fails torch's zip checks, one of another set has another
    number of rows."""
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        features = stored["features"]
    except (RuntimeError, OSError, EOFError, KeyError, TypeError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'unreadable'}"
    if not isinstance(features, Tensor) or len(features) != rows:
        return f"{len(features) if isinstance(features, Tensor) else 'no'} rows for {rows} images"
    return features, stored.get("labels")


def backbone_digest(model: TransferClassifier) -> str:
    """SHA-256 of every tensor of ``model``'s network outside its classifier block (weights and buffers)."""
    digest = hashlib.sha256()
    block = model.parts.classifier_block + "."
    for name, tensor in sorted(model.network.state_dict().items()):
        if not name.startswith(block):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
