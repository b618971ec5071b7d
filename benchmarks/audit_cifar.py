"""``audit`` on real CIFAR-10 with planted problems: how many of them it finds.

``make`` writes a copy of a CIFAR-10 class-folder tree (``../shared/data/cifar10``) as symbolic links, with a share
of the training images (default 5%, seeded) filed under another class chosen at random, and a number of test images
planted in the training folders of their own class, changed: re-encoded as JPEG (quality 75), resized (to 36 px and
centre-cropped back to 32), or cropped (2 pixels off each side, resized back). ``planted.json`` lists both.
``score`` reads ``audit``'s CSV files: precision among the first k of ``label_issues.csv`` (k = the images flipped)
and recall among the first 2k; and how many planted copies ``duplicates.csv`` pairs with their original::

    python benchmarks/audit_cifar.py make --source ../shared/data/cifar10 --output /tmp/cifar_planted
    python -m transfer_lightning audit --config configs/timm/efficientnet_lite0_frozen.yaml \\
        --config configs/overrides/shared_efficientnet_lite0.yaml --data.data_dir /tmp/cifar_planted --output /tmp/a
    python benchmarks/audit_cifar.py score --output /tmp/cifar_planted --audit /tmp/a
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path

from PIL import Image


def make(source: Path, output: Path, flip_share: float, copies: int, seed: int) -> None:
    rng = random.Random(seed)
    classes = sorted(folder.name for folder in (source / "train").iterdir())
    train = [(c, path) for c in classes for path in sorted((source / "train" / c).iterdir())]
    flipped = {
        path: rng.choice([other for other in classes if other != c])
        for c, path in rng.sample(train, round(flip_share * len(train)))
    }
    for split in ("train", "test"):
        for c in classes:
            (output / split / c).mkdir(parents=True, exist_ok=True)
    for c, path in train:
        (output / "train" / flipped.get(path, c) / path.name).symlink_to(path.resolve())
    for c in classes:
        for path in sorted((source / "test" / c).iterdir()):
            (output / "test" / c / path.name).symlink_to(path.resolve())
    tests = [(c, path) for c in classes for path in sorted((source / "test" / c).iterdir())]
    planted = []
    for n, (c, path) in enumerate(rng.sample(tests, copies)):
        image = Image.open(path).convert("RGB")
        change = ("jpeg", "resized", "cropped")[n % 3]
        name = f"planted_{path.stem}_{change}"
        if change == "jpeg":
            target = output / "train" / c / f"{name}.jpg"
            image.save(target, quality=75)
        else:
            changed = (
                image.resize((36, 36), Image.BICUBIC).crop((2, 2, 34, 34))
                if change == "resized"
                else (image.crop((2, 2, 30, 30)).resize((32, 32), Image.BICUBIC))
            )
            target = output / "train" / c / f"{name}.png"
            changed.save(target)
        planted.append([f"train/{c}/{target.name}", f"test/{c}/{path.name}", change])
    wrong = [f"train/{label}/{path.name}" for path, label in flipped.items()]
    (output / "planted.json").write_text(json.dumps({"flipped": wrong, "copies": planted}, indent=1))
    print(f"{len(wrong)} training labels flipped, {len(planted)} changed copies of test images in train: {output}")


def score(output: Path, audit: Path) -> None:
    planted = json.loads((output / "planted.json").read_text())
    flipped = set(planted["flipped"])
    k = len(flipped)
    ranked = [row["path"] for row in csv.DictReader((audit / "label_issues.csv").open())]
    flagged = sum(row["is_issue"] == "true" for row in csv.DictReader((audit / "label_issues.csv").open()))
    at_k = len(flipped & set(ranked[:k])) / k
    recall_2k = len(flipped & set(ranked[: 2 * k])) / k
    caught = len(flipped & set(ranked[:flagged]))
    print(f"wrong labels: {k} flipped; precision among the first {k}: {at_k:.3f}; recall among the first {2 * k}: "
          f"{recall_2k:.3f}; cleanlab flags {flagged} images, {caught} of them flipped")  # fmt: skip
    rows = list(csv.DictReader((audit / "duplicates.csv").open()))
    pairs = {frozenset({row["path_a"], row["path_b"]}): row for row in rows}
    alone = sum(float(row["similarity"]) >= 0.9 or float(row["pixel_similarity"]) >= 0.95 for row in rows)
    print(f"duplicate pairs: {len(rows)}, {alone} of them by features >= 0.9 or thumbnails >= 0.95 alone")
    for change in ("jpeg", "resized", "cropped"):
        copies = [
            pairs.get(frozenset({copy, original})) for copy, original, kind in planted["copies"] if kind == change
        ]
        found = [row for row in copies if row is not None]
        features = [float(row["similarity"]) for row in found]
        # Which of audit's default rules each found pair passes: features >= 0.9, thumbnails >= 0.95, both >= 0.75.
        alone = [(float(row["similarity"]) >= 0.9, float(row["pixel_similarity"]) >= 0.95) for row in found]
        by_features, by_pixels, either = (sum(f for f, _ in alone), sum(p for _, p in alone), sum(map(any, alone)))
        print(f"planted copies, {change}: {len(found)} of {len(copies)} found as duplicates; features >= 0.9: "
              f"{by_features}, thumbnails >= 0.95: {by_pixels}, either: {either}"
              + (f"; features' similarity {min(features):.3f} to {max(features):.3f}" if found else ""))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["make", "score"])
    parser.add_argument("--source", type=Path, default=Path("../shared/data/cifar10"))
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--audit", type=Path)
    parser.add_argument("--flip", type=float, default=0.05, help="share of training labels flipped")
    parser.add_argument("--copies", type=int, default=150, help="changed copies of test images planted in train")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.step == "make":
        make(args.source, args.output, args.flip, args.copies, args.seed)
    else:
        score(args.output, args.audit)


if __name__ == "__main__":
    main()
