"""Frozen-feature throughput by batch size and precision, side by side in one process.

Computes the pooled features of the same validation images with ``FrozenFeatureCache.compute``
for every (batch size, precision) pair and prints images/s, the speed-up over the current default
(batch 500, fp32), and how far bf16 features are from fp32 ones. Accuracy with bf16 features is
measured by the recipe runs in docs/results.md, not here.

    python benchmarks/feature_speed.py --data_dir ../shared/data/cifar10 \
        --weights ../shared/weights/mobilenet_v2_imagenet_features.pth --image_size 224 --images 1000
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch

from transfer_lightning.data import ImageFolderDataModule
from transfer_lightning.features import FrozenFeatureCache
from transfer_lightning.model import TransferClassifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--weights", default="DEFAULT")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[500, 100, 50, 25])
    args = parser.parse_args()

    datamodule = ImageFolderDataModule(args.data_dir, download=False, image_size=args.image_size)
    datamodule.prepare_data()
    datamodule.setup("fit")
    images = datamodule.val_set.subset(torch.arange(args.images))
    model = TransferClassifier(args.backbone, args.weights, datamodule.num_classes, freeze_backbone=True).eval()
    trainer = SimpleNamespace(precision="32-true", is_global_zero=False)  # no progress bar

    def measure(batch_size: int, precision: str) -> tuple[float, torch.Tensor]:
        cache = FrozenFeatureCache(batch_size=batch_size, precision=precision)
        cache.compute(model, datamodule, images.subset(torch.arange(min(batch_size, 50))), "warm-up", trainer)
        start = time.perf_counter()
        features = cache.compute(model, datamodule, images, "val", trainer)
        return args.images / (time.perf_counter() - start), features

    baseline, exact = measure(500, "fp32")
    print(f"{args.backbone} at {args.image_size} px, {args.images} images, {torch.get_num_threads()} threads")
    print("| batch | precision | images/s | x batch 500 fp32 | max abs diff to fp32 (of max |feature|) |")
    print("| ---: | --- | ---: | ---: | ---: |")
    print(f"| 500 | fp32 | {baseline:.1f} | x1.00 | 0 |")
    for batch_size in args.batch_sizes:
        for precision in ("fp32", "bf16"):
            if (batch_size, precision) == (500, "fp32"):
                continue
            speed, features = measure(batch_size, precision)
            difference = float((features - exact).abs().max() / exact.abs().max())
            print(f"| {batch_size} | {precision} | {speed:.1f} | x{speed / baseline:.2f} | {difference:.4f} |")


if __name__ == "__main__":
    main()
