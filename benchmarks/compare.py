"""Side by side: the reference loop and transfer_lightning, same data, model and hyper-parameters.

    python benchmarks/compare.py                        # both modes, real CIFAR-10 from ../shared if present
    python benchmarks/compare.py --mode frozen --epochs 5
    python benchmarks/compare.py --mode finetune --max-batches 100 --epochs 1

For each mode it runs the reference, then ours, ``--repeats`` times alternating in this one process,
and prints images/s of the training phase, wall time and best test accuracy of both, and the
ratios. The last line is machine-readable: ``speedup finetune=<images/s ratio> frozen=<wall ratio>``.
"""

from __future__ import annotations

import argparse
import functools
import pickle
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

from benchmarks.reference_loop import reference_model, run_reference  # noqa: E402
from transfer_lightning.data import ImageFolderDataModule  # noqa: E402
from transfer_lightning.model import TransferClassifier  # noqa: E402
from transfer_lightning.training import TrainingSpeed  # noqa: E402
from transfer_lightning.training.feature_cache import FrozenFeatureCache  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"


@dataclass
class Measurement:
    images_per_sec: float
    wall_seconds: float
    best_accuracy: float


class BestValAccuracy(pl.Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self.values.append(float(trainer.callback_metrics["val/acc"]))


def write_synthetic_cifar(root: Path, train_size: int, test_size: int) -> Path:
    """CIFAR-shaped random data in torchvision's format (labels learnable from the colour)."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [(f"data_batch_{i}", train_size // 5) for i in range(1, 6)] + [("test_batch", test_size)]
    for name, count in names:
        labels = rng.integers(0, 10, count)
        images = rng.integers(0, 128, (count, 3, 32, 32)) + (labels[:, None, None, None] * 12)
        entry = {"data": images.astype(np.uint8).reshape(count, -1), "labels": labels.tolist()}
        with open(folder / name, "wb") as file:
            pickle.dump(entry, file)
    return root


def datamodule(args: argparse.Namespace, data_dir: Path) -> ImageFolderDataModule:
    dm = ImageFolderDataModule(
        data_dir=str(data_dir),
        download=False,
        batch_size=100,
        val_size=0,  # the reference evaluates on the test set every epoch
        normalization="reference",
        image_size=args.image_size,
    )
    dm.prepare_data()
    dm.setup("fit")
    return dm


def run_ours(args: argparse.Namespace, dm: ImageFolderDataModule, frozen: bool) -> Measurement:
    torch.manual_seed(args.seed)
    optimizer = (
        functools.partial(torch.optim.SGD, lr=1e-3, momentum=0.9)
        if args.optimizer == "sgd"
        else functools.partial(torch.optim.Adam, lr=1e-3)
    )
    model = TransferClassifier(
        backbone=args.backbone,
        weights=args.weights,
        num_classes=dm.num_classes,
        freeze_backbone=frozen,
        channels_last=args.channels_last,
        optimizer=optimizer,
        scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=7, gamma=0.1),
    )
    speed, accuracy = TrainingSpeed(), BestValAccuracy()
    trainer = pl.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        max_epochs=args.epochs,
        limit_train_batches=args.max_batches or 1.0,
        num_sanity_val_steps=0,
        precision=args.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[FrozenFeatureCache(), speed, accuracy],
    )
    start = time.perf_counter()
    trainer.fit(model, dm)
    wall = time.perf_counter() - start
    return Measurement(statistics.mean(speed.history), wall, max(accuracy.values))


def run_baseline(args: argparse.Namespace, dm: ImageFolderDataModule, frozen: bool) -> Measurement:
    torch.manual_seed(args.seed)
    model = reference_model(args.backbone, args.weights, dm.num_classes, frozen)
    as_hwc = lambda arrays: (arrays.images.permute(0, 2, 3, 1).numpy(), arrays.labels.numpy())  # noqa: E731
    result = run_reference(
        as_hwc(dm.train_set.to_arrays()),
        as_hwc(dm.test_set.to_arrays()),
        model,
        args.optimizer,
        args.epochs,
        args.device,
        max_batches=args.max_batches,
        image_size=args.image_size,
    )
    return Measurement(result.images_per_sec, result.wall_seconds, max(result.test_accuracy))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    shared_weights = SHARED / "weights" / "mobilenet_v2_imagenet_features.pth"
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["finetune", "frozen", "both"], default="both")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument(
        "--weights",
        default=str(shared_weights) if shared_weights.is_file() else None,
        help="weights name or file, or 'none' for random init; default: ../shared's MobileNetV2 if present, else none",
    )
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-batches", type=int, default=None, help="train batches per epoch (default: all)")
    parser.add_argument("--data-dir", type=Path, default=None, help="default: ../shared's CIFAR-10, else synthetic")
    parser.add_argument("--synthetic", action="store_true", help="use generated CIFAR-shaped data")
    parser.add_argument("--synthetic-size", nargs=2, type=int, default=[10000, 2000], metavar=("TRAIN", "TEST"))
    parser.add_argument("--image-size", type=int, default=None, help="resize to this size (both paths)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="32-true", help="ours only, e.g. bf16-mixed")
    parser.add_argument(
        "--no-channels-last", dest="channels_last", action="store_false", help="ours in contiguous layout"
    )
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.weights in ("none", "null", ""):
        args.weights = None
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    pl.seed_everything(args.seed, verbose=False)
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = args.data_dir or (SHARED / "data" / "cifar10")
        if args.synthetic or not data_dir.is_dir():
            data_dir = write_synthetic_cifar(Path(scratch), *args.synthetic_size)
        dm = datamodule(args, data_dir)
        print(
            f"data: {data_dir} ({len(dm.train_set)} train, {len(dm.test_set)} test), backbone {args.backbone}, "
            f"weights {args.weights}, {args.optimizer}, {args.epochs} epoch(s), max batches {args.max_batches}, "
            f"device {args.device}, threads {torch.get_num_threads()}, precision (ours) {args.precision}, "
            f"image size {args.image_size or 32}",
            flush=True,
        )
        modes = ["finetune", "frozen"] if args.mode == "both" else [args.mode]
        speedups = {}
        for mode in modes:
            pairs = []
            for _ in range(args.repeats):
                pairs.append((run_baseline(args, dm, mode == "frozen"), run_ours(args, dm, mode == "frozen")))
            reference = [p[0] for p in pairs]
            ours = [p[1] for p in pairs]
            print(f"\n{mode}:")
            print(f"{'':10} {'images/s':>10} {'wall s':>8} {'best acc':>9}")
            for name, runs in (("reference", reference), ("ours", ours)):
                ips = statistics.median(r.images_per_sec for r in runs)
                wall = statistics.median(r.wall_seconds for r in runs)
                acc = statistics.median(r.best_accuracy for r in runs)
                print(f"{name:10} {ips:10.1f} {wall:8.1f} {100 * acc:8.2f}%")
            ips_ratio = statistics.median(o.images_per_sec / r.images_per_sec for r, o in pairs)
            wall_ratio = statistics.median(r.wall_seconds / o.wall_seconds for r, o in pairs)
            print(f"ratio      images/s x{ips_ratio:.2f}   end-to-end x{wall_ratio:.2f}")
            speedups[mode] = ips_ratio if mode == "finetune" else wall_ratio
        print("speedup " + " ".join(f"{mode}={ratio:.2f}" for mode, ratio in speedups.items()))


if __name__ == "__main__":
    main()
