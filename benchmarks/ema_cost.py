"""What the weight EMA (``--ema.enabled true``) costs per training step, side by side in one process.

Times SGD training steps of the fine-tuned MobileNetV2 of ``finetune_best.yaml`` (from ``features.7``,
the frozen blocks folded) on a fixed random batch, alternately without and with the EMA update that
:class:`~transfer_lightning.averaging.WeightEMA` makes after each step (torch's ``AveragedModel`` with
``get_ema_multi_avg_fn``, over parameters and buffers), and prints the seconds per step and the ratio.
What the EMA buys in accuracy is measured by the recipe runs in docs/results.md, not here.

    python benchmarks/ema_cost.py --image_size 128 --steps 10
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing
from benchmarks.finetune_speed import training_step  # noqa: E402
from transfer_lightning.model import TransferClassifier  # noqa: E402
from transfer_lightning.network.freezing import run_folded  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=100)
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each kind")
    args = parser.parse_args()
    model = TransferClassifier(backbone="mobilenet_v2", weights=None, trainable_from="features.7")
    run_folded(model.frozen.always_frozen_modules())
    step = training_step(model, args.batch_size, args.image_size)
    average = AveragedModel(model, use_buffers=True, multi_avg_fn=get_ema_multi_avg_fn(0.999))
    step()
    average.update_parameters(model)  # the first update copies; the timed ones average
    plain = with_ema = 0.0
    for _ in range(args.steps):  # alternated, so that a change of the machine's speed hits both alike
        start = time.perf_counter()
        step()
        plain += time.perf_counter() - start
        start = time.perf_counter()
        step()
        average.update_parameters(model)
        with_ema += time.perf_counter() - start
    plain, with_ema = plain / args.steps, with_ema / args.steps
    print(f"{args.image_size} px, batch {args.batch_size}, {args.steps} steps each")
    print(f"training step:            {plain:.3f} s")
    print(f"training step + EMA:      {with_ema:.3f} s")
    print(f"ratio (with / without):   {with_ema / plain:.3f}")


if __name__ == "__main__":
    main()
