"""How large the frozen backbone's pooled features are with BatchNorm in eval vs train mode.

    python benchmarks/feature_spread.py [--data-dir ../shared/data/cifar10] [--weights FILE]

Prints, per input normalisation, the mean over features of the standard deviation over images
of the pooled features of the first 1,000 training images (docs/results.md explains why it
matters for SGD on a frozen backbone).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

from transfer_lightning.data import NORMALIZATIONS, ImageFolderDataModule  # noqa: E402
from transfer_lightning.model import TransferClassifier  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(SHARED / "data" / "cifar10"))
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--weights", default=str(SHARED / "weights" / "mobilenet_v2_imagenet_features.pth"))
    parser.add_argument("--images", type=int, default=1000)
    args = parser.parse_args()
    for normalization in NORMALIZATIONS:
        datamodule = ImageFolderDataModule(data_dir=args.data_dir, download=False, normalization=normalization)
        datamodule.setup("fit")
        batch = datamodule.batch_transform(next(datamodule.train_set.batches(args.images))[0], train=False)
        for mode, batchnorm in (("eval", False), ("train", True)):
            # A fresh model each time: a forward pass in train mode moves the running statistics.
            model = TransferClassifier(backbone=args.backbone, weights=args.weights, num_classes=10)
            model.train(batchnorm)
            features = model.classifier_inputs(batch)
            print(
                f"normalization {normalization:9}  BatchNorm {mode:5}  spread {features.std(0).mean():.3f}  "
                f"mean {features.mean():.3f}"
            )


if __name__ == "__main__":
    main()
