"""Label tables made from real CIFAR-10 class folders, for measuring the table route on real data.

    python benchmarks/cifar_tables.py listing --output data/cifar10_table.csv
    python benchmarks/cifar_tables.py mosaics --output data/mosaics

``listing`` writes a CSV of every image of ``--cifar`` (``file,label,split``, paths relative to
``--cifar``) in the folders' own order, so that a run on ``--data.labels_file`` reads the very images,
in the very order, that the same run on the class folders reads: its accuracy must be the same.

``mosaics`` builds a real multi-label set: each 64x64 image is a 2x2 mosaic of CIFAR-10 images drawn
at random (seeded) from one split, and its labels are the set of classes in it. It writes
``OUTPUT/images/{train,test}/NNNNN.png`` and ``OUTPUT/labels.csv`` (``file,labels,split``, paths
relative to OUTPUT, labels separated by spaces); the training mosaics use only CIFAR-10's training
images, the test mosaics only its test images.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

from transfer_lightning.data.listing import find_classes, list_images  # noqa: E402
from transfer_lightning.logs import progress_bar  # noqa: E402

SHARED_CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def cifar_split(cifar: Path, split: str) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, class index) of every image of a split, in torchvision's ImageFolder order, and the class names."""
    classes = find_classes(cifar / split)
    samples, _ = list_images(cifar / split, classes)
    return samples, classes


def write_listing(cifar: Path, output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["file", "label", "split"])
        for split in ("train", "test"):
            samples, classes = cifar_split(cifar, split)
            for path, label in samples:
                writer.writerow([Path(os.path.relpath(path, cifar)).as_posix(), classes[label], split])
    print(f"Wrote {output}: the {sum(1 for _ in open(output)) - 1} images of {cifar}.")


def write_mosaics(cifar: Path, output: Path, counts: dict[str, int], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for split, count in counts.items():
        samples, classes = cifar_split(cifar, split)
        folder = output / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        picks = torch.randint(0, len(samples), (count, 4), generator=generator).tolist()
        for index, four in enumerate(progress_bar(picks, desc=f"Mosaics ({split})", unit="img")):
            tiles = [np.asarray(Image.open(samples[i][0]).convert("RGB")) for i in four]
            mosaic = np.concatenate([np.concatenate(tiles[:2], axis=1), np.concatenate(tiles[2:], axis=1)], axis=0)
            name = f"images/{split}/{index:05d}.png"
            Image.fromarray(mosaic).save(output / name)
            labels = sorted({classes[samples[i][1]] for i in four})
            rows.append([name, " ".join(labels), split])
    with open(output / "labels.csv", "w", newline="") as file:
        csv.writer(file).writerows([["file", "labels", "split"], *rows])
    print(f"Wrote {output / 'labels.csv'}: {len(rows)} mosaics ({counts}).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["listing", "mosaics"])
    parser.add_argument("--cifar", type=Path, default=SHARED_CIFAR10, help="CIFAR-10 as train/ and test/ class folders")
    parser.add_argument("--output", type=Path, required=True, help="listing: the CSV file; mosaics: a folder")
    parser.add_argument("--train", type=int, default=5000, help="mosaics made from the training images")
    parser.add_argument("--test", type=int, default=2000, help="mosaics made from the test images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.what == "listing":
        write_listing(args.cifar, args.output)
    else:
        write_mosaics(args.cifar, args.output, {"train": args.train, "test": args.test}, args.seed)


if __name__ == "__main__":
    main()
