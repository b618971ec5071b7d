"""``python -m transfer_lightning optimize --data.data_dir PHOTOS --data.image_size 224 --output DIR|s3://...``:
a data set written once into LitData's optimized chunks, for ``fit --data.streaming_dir`` on any number of nodes."""

from __future__ import annotations

import os
import time
from pathlib import Path

from jsonargparse import ArgumentParser

from transfer_lightning.commands.cli import program_name
from transfer_lightning.data import ImageFolderDataModule
from transfer_lightning.data.optimizing import refuse_existing, write_optimized
from transfer_lightning.data.settings import check_data_settings
from transfer_lightning.data.source import FileSource
from transfer_lightning.data.sources import SOURCE_SETTINGS, open_source
from transfer_lightning.data.splits import make_splits
from transfer_lightning.data.storage import is_remote, require_litdata
from transfer_lightning.data.streaming import StreamInfo
from transfer_lightning.data.transforms import DEFAULT_CROP_PCT, Interpolation
from transfer_lightning.errors import UserInputError
from transfer_lightning.files import human_size

#: Data-module arguments that only matter when training reads the data, not when it is written.
TRAINING_ONLY = {
    "batch_size", "num_workers", "normalization", "augment", "crop_scale", "class_balance", "predict_dir",
    "download", "streaming_dir", "max_cache_size", "class_names",
}  # fmt: skip


def build_parser(prog: str) -> ArgumentParser:
    parser = ArgumentParser(
        prog=prog,
        description="Write a photo folder or a label table once into LitData's optimized chunks, locally or to "
        "object storage, for fit/validate/test/predict --data.streaming_dir.",
    )
    # The data module's options and help texts; only its source is made (open_source), never a DataModule.
    parser.add_class_arguments(ImageFolderDataModule, "data", skip=TRAINING_ONLY, instantiate=False)
    parser.add_argument("--output", type=str, required=True, help="A new folder, or s3://BUCKET/PATH (gs://, r2://).")
    parser.add_argument(
        "--crop_pct", type=float, default=DEFAULT_CROP_PCT,
        help="Centre-crop fraction of the recipe's weights: images are stored at image_size / crop_pct (224 -> 256).",
    )  # fmt: skip
    parser.add_argument(
        "--interpolation", type=Interpolation, default="bilinear",
        help="Resampling of the recipe's weights (bicubic for timm's EfficientNet-Lite0), as the local store resizes.",
    )  # fmt: skip
    parser.add_argument("--encoding", type=str, default="jpeg", choices=["jpeg", "raw"], help="JPEG, or uint8 pixels.")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality (1-100).")
    parser.add_argument("--workers", type=int, default=None, help="Writing processes; default one per core.")
    parser.add_argument("--chunk_bytes", type=str, default="64MB", help="Size of LitData's chunk files.")
    return parser


def main(argv: list[str]) -> StreamInfo:
    """Parse ``argv``, split the source and write it, and say what was written."""
    parser = build_parser(f"{program_name()} optimize")
    config = parser.parse_args(argv)
    data = config.data
    if not 1 <= config.quality <= 100:
        raise UserInputError(f"--quality must be between 1 and 100, got {config.quality}.")
    if data.image_size == "auto":
        raise UserInputError("optimize needs the image size to store: --data.image_size 224 (or null: as they are).")
    check_data_settings(1, 0, data.val_size, data.image_size, (1.0, 1.0), "imagenet", "none")
    require_litdata()
    refuse_existing(config.output, data.storage_options)
    settings = {name: value for name, value in data.items() if name in SOURCE_SETTINGS}
    source = open_source(**settings, download=False)
    if not isinstance(source, FileSource):
        raise UserInputError(
            f"optimize reads photo folders, label tables and Parquet; {source.describe()} is none of them (point "
            "--data.data_dir at a folder of class folders instead)."
        )
    size, view = source.stored_size(data.image_size, config.crop_pct)
    splits = make_splits(source.sample_pools(), data.val_size, data.split_seed, source.root)
    written = {"train": splits.train}
    written |= {} if splits.val_is_test else {"val": splits.val}
    written |= {} if splits.test_is_val else {"test": splits.test}
    info = StreamInfo(
        task=source.task,
        class_names=source.class_names,
        size=size,
        view=view,
        image_size=data.image_size,
        crop_pct=config.crop_pct,
        interpolation=config.interpolation,
        encoding=config.encoding,
        quality=config.quality if config.encoding == "jpeg" else None,
        split_sizes={},
        train_class_counts=[],
        description=splits.description,
        source=source.describe(),
    )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    start = time.perf_counter()
    info = write_optimized(
        config.output,
        written,
        info,
        config.workers or cores,
        config.chunk_bytes,
        data.storage_options,
        data.skip_bad_images,
        data.split_seed,
    )
    sizes = ", ".join(f"{split} {count}" for split, count in info.split_sizes.items())
    print(
        f"Optimized {sizes} images ({size[0]}x{size[1]}, {info.encoding}) into {config.output} in "
        f"{time.perf_counter() - start:.1f} s{_written_size(config.output)}. Train from it with "
        f"--data.streaming_dir {config.output}"
    )
    return info


def _written_size(output: str) -> str:
    if is_remote(output):
        return ""
    return f" ({human_size(sum(file.stat().st_size for file in Path(output).rglob('*') if file.is_file()))})"
