"""Frozen-feature throughput by engine, batch size and precision, side by side in one process.

Computes the pooled features of the same validation images with ``FrozenFeatureCache.compute``
for every (engine, batch size, precision) and prints images/s, the speed-up over torch fp32 at the
first batch size, and how far the features are from those. The onnxruntime engine's one-off
export (printed) is left out of its rate. Accuracy is measured by the recipe runs in
docs/results.md, not here.

    python benchmarks/feature_speed.py --data_dir ../shared/data/cifar10 \
        --weights ../shared/weights/mobilenet_v2_imagenet_features.pth --image_size 224 --images 1000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

from transfer_lightning.data import ImageFolderDataModule  # noqa: E402
from transfer_lightning.model import TransferClassifier  # noqa: E402
from transfer_lightning.training.feature_cache import FrozenFeatureCache  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--weights", default="DEFAULT")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[500, 100, 50])
    parser.add_argument("--engines", nargs="+", default=["torch", "onnxruntime"], choices=["torch", "onnxruntime"])
    parser.add_argument("--bf16", action="store_true", help="also torch with bf16 autocast")
    args = parser.parse_args()

    datamodule = ImageFolderDataModule(args.data_dir, download=False, image_size=args.image_size)
    datamodule.prepare_data()
    datamodule.setup("fit")
    images = datamodule.val_set.subset(torch.arange(args.images))
    model = TransferClassifier(args.backbone, args.weights, datamodule.num_classes, freeze_backbone=True).eval()
    trainer = SimpleNamespace(precision="32-true", is_global_zero=False)  # no progress bar

    def measure(batch_size: int, precision: str, engine: str) -> tuple[float, torch.Tensor]:
        cache = FrozenFeatureCache(batch_size=batch_size, precision=precision, engine=engine)
        start = time.perf_counter()
        cache.compute(model, datamodule, images.subset(torch.arange(batch_size)), "warm-up", trainer)
        if engine == "onnxruntime":
            print(f"onnxruntime export, check and warm-up at batch {batch_size}: {time.perf_counter() - start:.1f} s")
        start = time.perf_counter()
        features = cache.compute(model, datamodule, images, "val", trainer)
        return args.images / (time.perf_counter() - start), features

    runs = [(engine, "fp32") for engine in args.engines] + ([("torch", "bf16")] if args.bf16 else [])
    rows, baseline, exact = [], None, None
    for batch_size in args.batch_sizes:
        for engine, precision in runs:
            speed, features = measure(batch_size, precision, engine)
            if baseline is None:
                baseline, exact = speed, features
            difference = float((features - exact).abs().max() / exact.abs().max())
            rows.append(
                f"| {engine} | {batch_size} | {precision} | {speed:.1f} | x{speed / baseline:.2f} | {difference:.1e} |"
            )
    print(f"{args.backbone} at {args.image_size} px, {args.images} images, {torch.get_num_threads()} threads")
    baseline_name = f"{runs[0][0]} fp32 batch {args.batch_sizes[0]}"
    print(f"| engine | batch | precision | images/s | x {baseline_name} | max abs diff (of max |feature|) |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
