"""Fine-tuning throughput by ``model.trainable_from``, side by side in one process.

Runs SGD training steps (forward, loss, backward, update) of a :class:`TransferClassifier` on
random batches for the whole network and for each ``--trainable_from`` module, and prints
training images/s and the speed-up over the whole network. The frozen modules before
``trainable_from`` run forward only, in eval mode; the last columns run them as a run does, with
their BatchNorm layers folded into the convolutions (``transfer_lightning.network.freezing.run_folded``).
Accuracy is measured by the recipe runs in docs/results.md, not here.

    python benchmarks/finetune_speed.py --backbone mobilenet_v2 --image_size 96 \
        --trainable_from features.4 features.7 features.11
    python benchmarks/finetune_speed.py --image_size 96 --profile   # where a whole-network step goes
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

from transfer_lightning.model import TransferClassifier  # noqa: E402
from transfer_lightning.network.freezing import run_folded  # noqa: E402


def training_step(model: TransferClassifier, batch_size: int, image_size: int) -> Callable[[], None]:
    """One SGD step on a fixed random batch, as a function."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    images = torch.randn(batch_size, 3, image_size, image_size)
    labels = torch.randint(0, model.hparams.num_classes, (batch_size,))
    model.train()

    def step() -> None:
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()

    return step


def images_per_second(model: TransferClassifier, batch_size: int, image_size: int, steps: int) -> float:
    """Training images/s over ``steps`` steps, after one warm-up step."""
    step = training_step(model, batch_size, image_size)
    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--image_size", type=int, default=96)
    parser.add_argument("--batch_size", type=int, default=100)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--trainable_from", nargs="+", default=["features.4", "features.7"])
    parser.add_argument("--profile", action="store_true", help="print torch's profile of whole-network steps instead")
    args = parser.parse_args()

    if args.profile:
        model = TransferClassifier(args.backbone, weights=None, num_classes=10)
        model.setup("fit")
        step = training_step(model, args.batch_size, args.image_size)
        step()
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            for _ in range(2):
                step()
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
        return

    rows, baseline = [], None
    for start in [None, *args.trainable_from]:
        model = TransferClassifier(args.backbone, weights=None, num_classes=10, trainable_from=start)
        model.setup("fit")  # channels-last, as in a run
        speed = images_per_second(model, args.batch_size, args.image_size, args.steps)
        baseline = baseline or speed
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        row = f"| {start or '(whole network)'} | {trainable / 1e6:.2f} M | {speed:.1f} | x{speed / baseline:.2f} |"
        if start:
            run_folded(model.frozen.always_frozen_modules())
            folded = images_per_second(model, args.batch_size, args.image_size, args.steps)
            row += f" {folded:.1f} | x{folded / baseline:.2f} |"
        rows.append(row)
    print(f"{args.backbone} at {args.image_size} px, batch {args.batch_size}, {torch.get_num_threads()} threads")
    print("| trainable_from | trainable parameters | training images/s | x whole network", end=" ")
    print("| BN folded | x whole network |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
