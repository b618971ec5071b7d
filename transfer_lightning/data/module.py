"""ImageFolderDataModule: CIFAR-10, image folders, a label table or an optimized stream; honest splits, batches
made on the device. It puts the pieces of :mod:`transfer_lightning.data` together for Lightning's hooks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader

from transfer_lightning.data.datasets import (
    ImageTensorDataset,
    class_counts,
    keep_batch,
    make_sampler,
)
from transfer_lightning.data.edits import DataEdits
from transfer_lightning.data.predict_images import NewImages
from transfer_lightning.data.preparation import BatchPreparation, ImageSize, Preparation
from transfer_lightning.data.settings import ClassBalance, check_data_settings, default_cache_dir
from transfer_lightning.data.source import Source
from transfer_lightning.data.sources import SOURCE_SETTINGS, open_source
from transfer_lightning.data.splits import make_splits
from transfer_lightning.data.streaming import StreamSource, stream_loader
from transfer_lightning.data.transforms import Normalization, Preprocessing, View, WeightsPreprocessing
from transfer_lightning.errors import UserInputError
from transfer_lightning.tasks import TaskName


class ImageFolderDataModule(pl.LightningDataModule):
    """CIFAR-10 or a tree of image folders, with honest train / val / test splits.

    Reads ``data_dir/cifar-10-batches-py`` (torchvision's format) or an image-folder tree in any of
    these layouts (class names are the folder names; split folders by their common names in any
    case): ``train/`` + ``test/`` (val carved out of train), ``train/`` + ``val/`` or ``valid/`` (val
    also tests), ``train/`` + ``val/`` + ``test/``, or class folders directly under ``data_dir`` (val
    carved out, and also tests). Without ``data_dir``, CIFAR-10 in ``./data``, downloaded there when
    ``download`` is true: a folder the user names is never downloaded into unless it is empty, so a
    mistyped path is an error, not a CIFAR-10 run. Image folders are decoded once into a memory-mapped store under
    ``cache_dir``. Images of one size keep it (CIFAR-10's 32x32); mixed sizes are stored at
    ``image_size / crop_pct`` (shorter side, centre square: 256 for 224) and cropped on the device.

    With ``labels_file``, a CSV or TSV table names the images (under ``images_dir``, or ``data_dir``, or
    the table's folder) and their labels: one class per image, or several (multi-label: ``task`` is
    then multilabel); its split column, if any, decides the splits (see :mod:`~transfer_lightning.data.tables`).

    Args:
        data_dir: Folder holding cifar-10-batches-py/ or an image-folder tree; null: CIFAR-10 in ./data.
        download: Download CIFAR-10 when data_dir is null (into ./data) or an empty folder, and it is not there yet.
        batch_size: Images per batch (per device under DDP).
        num_workers: DataLoader worker processes; batches are cheap tensor slices, so 0 is usually fastest.
        val_size: Images held out of the training pool for validation (stratified): a count, or a fraction such
            as 0.2. Not used when the tree has a val folder. 0 validates on the test set, which only reproduces
            the reference recipe: a model picked on the test set has no honest test score.
        split_seed: Seed of the validation split; the same seed gives the same split.
        normalization: auto (the mean, std, crop fraction and interpolation of the backbone's weights,
            from their metadata; ImageNet's for a data module used without the model), imagenet,
            cifar10 (its own statistics) or reference (mean = std = 0.5, as the published recipe).
        augment: Random augmentation of training batches: for images kept at their own size a
            4-pixel padded random crop and a flip; for resized images a random resized crop and a flip.
        image_size: Side of the square images the network gets (e.g. 64, 128, 224); auto: the size the
            backbone's weights were trained at; null keeps the images' own size, which needs images of one size.
        crop_scale: Area range (fractions of the image) of the random resized crop.
        skip_bad_images: Skip image files that do not decode (logged, and listed in the store's skipped.txt).
        class_balance: none; sampler (draw training images inversely to their class's count); or loss (weights).
        cache_dir: Where decoded stores are kept; default $XDG_CACHE_HOME/transfer_lightning.
        predict_dir: New images for ``predict`` (a folder, any depth, or a file); null: the test split.
        class_names: The class names in label order; null: the class folders' (sorted), a table's or CIFAR-10's.
        labels_file: A CSV or TSV table of image files and their labels, instead of class folders; a
            relative path not found from here is looked for in data_dir.
        images_dir: Where the table's files are (its paths are relative to it); default data_dir, or
            the table's folder when data_dir is null.
        file_column: The table's column of image files; null finds file, filename, image, id, path, ...
        label_column: The table's column of labels, or a list of its 0/1 columns (one per class); null
            finds label, labels, class, tags, target, ..., else takes the columns that hold only 0 and 1.
        split_column: The table's column of splits (train, val, test); null finds split or subset, if any.
        label_delimiter: What separates several labels in one field: auto (one of ; , | found in the
            labels, or a space when the split words are a class vocabulary: see docs/guides/your-images.md), none
            (one class name per row, spaces and all), space, or the delimiter itself.
        streaming_dir: A data set written by ``optimize`` (a folder, or s3://, gs://, r2://), streamed with LitData
            instead of data_dir (docs/guides/streaming.md; the [stream] extra).
        max_cache_size: Most disk the downloaded chunks of a remote streaming_dir take per split (e.g. 50GB).
        storage_options: The object store client's options, e.g. {endpoint_url: http://127.0.0.1:9000}.
        parquet: Parquet files as the Hugging Face Hub writes them (files, a folder or a pattern such as
            data/*.parquet; the [parquet] extra), instead of data_dir: images embedded, splits by file name.
        exclude: A CSV of images to leave out before the data is split, by a ``path`` column (audit's CSV files:
            their flagged rows; duplicates.csv: the second image of each pair); see docs/guides/audit.md.
        relabel: A CSV of images to give another label, by ``path`` and ``label`` columns (several labels joined
            by ``;``), or audit's label_issues.csv (its flagged rows take their suggested label).
    """

    def __init__(
        self,
        data_dir: str | None = None,
        download: bool = True,
        batch_size: int = 100,
        num_workers: int = 0,
        val_size: int | float = 5000,
        split_seed: int = 0,
        normalization: Normalization = "auto",
        augment: bool = False,
        image_size: ImageSize = None,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        skip_bad_images: bool = False,
        class_balance: ClassBalance = "none",
        cache_dir: str | None = None,
        predict_dir: str | None = None,
        class_names: list[str] | None = None,
        labels_file: str | None = None,
        images_dir: str | None = None,
        file_column: str | None = None,
        label_column: str | list[str] | None = None,
        split_column: str | None = None,
        label_delimiter: str = "auto",
        streaming_dir: str | None = None,
        max_cache_size: str = "50GB",
        storage_options: dict[str, Any] | None = None,
        parquet: str | list[str] | None = None,
        exclude: str | None = None,
        relabel: str | None = None,
    ) -> None:
        super().__init__()
        # class_names would clash with the model's hyperparameter of that name, which holds the resolved list.
        self.save_hyperparameters(ignore=["class_names"])
        check_data_settings(batch_size, num_workers, val_size, image_size, crop_scale, normalization, class_balance)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        if streaming_dir and (exclude or relabel):
            raise UserInputError(
                "--data.exclude and --data.relabel edit a folder, table, Parquet or CIFAR-10 before it is split; a "
                "stream is split already: train from the data it was optimized from, or optimize it again."
            )
        #: The images ``exclude`` leaves out and ``relabel`` gives new labels, read once (a bad file fails here).
        self.edits = DataEdits.read(exclude, relabel)
        #: ``predict_dir``'s images, predicted on instead of the test split.
        self.new_images = NewImages(Path(predict_dir).expanduser(), self.cache_dir) if predict_dir else None
        # Every source setting as given (hparams holds them all but class_names, kept out above).
        source_settings = {name: self.hparams.get(name) for name in SOURCE_SETTINGS} | {"class_names": class_names}
        self._source: Source | None = None
        if self.new_images is None:
            self._source = open_source(**source_settings)
        # New images take the checkpoint's class names; its training data (folders or CIFAR-10, never downloaded)
        # is only opened for a checkpoint that does not record its preprocessing.
        self._training_data = {"data_dir": data_dir, "download": False, "cache_dir": cache_dir}
        given = list(class_names) if class_names is not None and self.new_images is not None else None
        self.class_names = given or self.source.class_names
        self._preparer = BatchPreparation(normalization, image_size, tuple(crop_scale))
        #: The backbone's preprocessing, handed over by :meth:`use_weights`.
        self._weights: WeightsPreprocessing | None = None
        #: How stored images become the network's input; set with the stored size (see ``prepare_batch``).
        self.view: View = "resize"
        self.train_set: ImageTensorDataset | None = None
        self.val_set: ImageTensorDataset | None = None
        self.test_set: ImageTensorDataset | None = None
        self.predict_set: ImageTensorDataset | None = None

    @property
    def source(self) -> Source:
        """Where the images come from (:mod:`~transfer_lightning.data.sources`)."""
        if self._source is None:
            self._source = open_source(**self._training_data)
        return self._source

    @property
    def streamed(self) -> bool:
        return isinstance(self._source, StreamSource)

    @property
    def predict_paths(self) -> list[str] | None:
        """Each predicted new image's path as the CSV shows it; ``None`` when predicting the test split."""
        return self.new_images.paths if self.new_images is not None else None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def task(self) -> TaskName | None:
        """The source's task (:mod:`~transfer_lightning.tasks`); ``None`` when predicting new images (the model's)."""
        return self.source.task if self.new_images is None else None

    @property
    def input_size(self) -> tuple[int, int] | None:
        """(height, width) of the batches the network gets; ``None`` before ``setup``."""
        if self.preparation.image_size is not None:
            return (self.preparation.image_size,) * 2
        if self.streamed:
            return self.source.info.size
        return tuple(self.test_set.arrays.images.shape[-2:]) if self.test_set is not None else None

    @property
    def loss_weights(self) -> Tensor | None:
        """Class weights for the training loss when ``class_balance`` is loss; else ``None``."""
        if self.hparams.class_balance != "loss" or self.train_set is None:
            return None
        return self.source.loss_weights(self.train_set)

    @property
    def preprocessing(self) -> Preprocessing:
        """How an image file becomes the network's input at evaluation (saved in checkpoints)."""
        if self.new_images is not None and self.new_images.checkpoint_preprocessing is not None:
            return self.new_images.checkpoint_preprocessing
        p = self.preparation
        try:
            size, self.view = self.source.stored_size(p.image_size, p.crop_pct)
        except UserInputError:
            if self.new_images is None:
                raise
            raise UserInputError(
                "The checkpoint does not say how its images were prepared (an older version's) and "
                "no training data tells: pass the training data's --data.data_dir and --data.image_size too."
            ) from None
        resize = self.source.stored_interpolation(p.interpolation)
        return Preprocessing(size, self.view, p.image_size, p.mean, p.std, p.interpolation, resize)

    @property
    def preparation(self) -> Preparation:
        """The settings with ``auto`` resolved from the weights handed over by :meth:`use_weights`."""
        needs_weights = "auto" in (self.hparams.normalization, self.hparams.image_size)
        if needs_weights and self._weights is None and self.trainer is not None:
            raise UserInputError(
                "data.normalization or data.image_size auto takes the backbone's preprocessing: call "
                "datamodule.use_weights(model.weights_preprocessing) before the Trainer runs (the CLI does), "
                "or set both."
            )
        return self._preparer.resolved(self._weights)

    def use_weights(self, weights: WeightsPreprocessing) -> Preparation:
        """The handshake with the model: resolve ``auto`` from its backbone's ``weights`` (once, before any store is
        built: the stores and the checkpoint depend on them). Without it, ``auto`` means ImageNet's."""
        self._weights = weights
        return self.preparation

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: :attr:`preprocessing`, which depends on the images, not only the settings."""
        return {"preprocessing": self.preprocessing.to_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Take the checkpoint's preprocessing for ``predict_dir`` (the training data may be absent)."""
        if self.new_images is not None and "preprocessing" in state_dict:
            self.new_images.checkpoint_preprocessing = Preprocessing.from_dict(state_dict["preprocessing"])

    def prepare_data(self) -> None:
        """Download CIFAR-10, or decode the image files into their stores (once per node; a stream: nothing)."""
        if self.new_images is not None and self.trainer and self.trainer.predicting:
            return  # decoded by predict_dataloader with the checkpoint's sizes
        # Here, before Lightning creates the run's folder (setup comes after), so a bad val_size leaves none.
        self.source.prepare(self.preprocessing.decoding, self.hparams.val_size)

    def setup(self, stage: str) -> None:
        if self.train_set is not None or (stage == "predict" and self.new_images is not None):
            return
        if self.hparams.class_balance == "sampler" and (self.task == "multilabel" or self.streamed):
            raise UserInputError(
                "data.class_balance sampler draws images by their one class, at random; with several labels per image, "
                "or over a stream, use class_balance loss (class weights in the loss)."
            )
        if self.streamed:
            return self._setup_stream()
        source = self.source
        pools = self.edits.apply(source.pools(self.preprocessing.decoding), source.names_root, self.class_names)
        splits = make_splits(pools, self.hparams.val_size, self.hparams.split_seed, source.root)
        self.train_set, self.val_set, self.test_set = splits.train, splits.val, splits.test
        several = ", several per image" if self.task == "multilabel" else ""
        rank_zero_info(f"Data ({self.num_classes} classes{several}): {splits.description}.")
        summary = source.summary(splits)
        if summary:
            rank_zero_info(summary)
        counts = class_counts(self.train_set.labels, self.num_classes)
        rank_zero_info(
            "Training images per class: " + ", ".join(f"{n} {c}" for c, n in zip(self.class_names, counts, strict=True))
        )

    def _setup_stream(self) -> None:
        """Open the optimized data set's splits, here where the rank is known; one shuffling seed on every rank."""
        self.view, seed = self.source.info.view, torch.initial_seed() % 2**31
        if self.trainer is not None:
            seed = self.trainer.strategy.broadcast(seed)
        self.train_set, self.val_set, self.test_set = self.source.splits(seed, self.preparation)
        rank_zero_info(f"Data ({self.num_classes} classes, streamed): {self.source.describe()}.")

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)

    def predict_dataloader(self) -> DataLoader:
        """The test split; or with ``predict_dir`` its images, decoded as the checkpoint's preprocessing says."""
        if self.new_images is None:
            return self._loader(self.test_set)
        self.predict_set = self.new_images.load(self.preprocessing)
        return self._loader(self.predict_set)

    def _loader(self, dataset: ImageTensorDataset | None, shuffle: bool = False) -> DataLoader:
        on_gpu = self.trainer is not None and isinstance(self.trainer.accelerator, CUDAAccelerator)
        if self.streamed and not isinstance(dataset, ImageTensorDataset):  # features are tensors
            trainer = self.trainer if shuffle else None  # the training loader's state counts trained batches
            return stream_loader(dataset, self.hparams.batch_size, self.hparams.num_workers, on_gpu, trainer)
        world_size = self.trainer.world_size if self.trainer is not None else 1
        rank = self.trainer.global_rank if self.trainer is not None else 0
        balance = self.num_classes if self.hparams.class_balance == "sampler" else None
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            sampler=make_sampler(dataset, shuffle, balance, rank, world_size),
            num_workers=self.hparams.num_workers,
            collate_fn=keep_batch,
            pin_memory=on_gpu,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def on_after_batch_transfer(self, batch: tuple[Tensor, Tensor], dataloader_idx: int) -> tuple[Tensor, Tensor]:
        """Normalise (and in training, augment) the uint8 batch on the device it now lives on."""
        images, labels = batch
        if images.dtype != torch.uint8:  # cached backbone features (the frozen-feature cache) arrive ready to use
            return batch
        new = self.new_images.preprocessing if self.new_images is not None else None
        if new is not None and self.trainer is not None and self.trainer.predicting:
            return new(images), labels  # new images, prepared as the checkpoint says
        training = self.trainer is not None and self.trainer.training
        return self.batch_transform(images, train=training), labels

    def batch_transform(self, images: Tensor, train: bool) -> Tensor:
        """uint8 images on any device -> the network's input; random augmentation only if ``train``."""
        return self._preparer(images, self.preparation, augment=self.hparams.augment and train, view=self.view)


#: The earlier name, kept so that existing code and configs work.
CIFAR10DataModule = ImageFolderDataModule
