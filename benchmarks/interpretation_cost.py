"""What the interpretation pictures cost ``test``: one checkpoint tested with them off and on in one process.

Builds the model, data and trainer from the configs as ``test`` does, then runs ``trainer.test`` with
``interpretation.enabled`` false and true in turn (``--repeats`` times each, after one warm-up test)
and prints each time, the medians and their ratio. Any other option goes to the CLI, e.g.
``--feature_cache.enabled false`` to send the test images through the backbone instead of stored features.

    python benchmarks/interpretation_cost.py --ckpt_path lightning_logs/version_0/checkpoints/best-....ckpt \
        --config configs/recipes/frozen_best.yaml --config configs/overrides/shared_mobilenet_v2.yaml
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from transfer_lightning.commands.cli import TransferLightningCLI
from transfer_lightning.interpretation import Interpretation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_path", required=True)
    parser.add_argument("--repeats", type=int, default=2)
    args, cli_args = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as logs:
        cli = TransferLightningCLI(
            args=[*cli_args, f"--trainer.default_root_dir={logs}", f"--trainer.logger.init_args.save_dir={logs}",
                  "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"],
            run=False,
        )  # fmt: skip
        interpretation = next(c for c in cli.trainer.callbacks if isinstance(c, Interpretation))

        def test(enabled: bool) -> float:
            interpretation.enabled = enabled
            start = time.perf_counter()
            cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=args.ckpt_path, verbose=False)
            return time.perf_counter() - start

        test(False)  # warm-up: decoded store and stored features read once
        times = {False: [], True: []}
        for _ in range(args.repeats):
            for enabled in (False, True):
                times[enabled].append(test(enabled))
    images = len(cli.datamodule.test_set)
    for enabled, label in ((False, "interpretation off"), (True, "interpretation on")):
        runs = ", ".join(f"{t:.2f}" for t in times[enabled])
        print(f"{label:20s} test of {images} images: {runs} s (median {statistics.median(times[enabled]):.2f} s)")
    off, on = statistics.median(times[False]), statistics.median(times[True])
    print(f"on / off: {on / off:.3f} (+{on - off:.2f} s)")


if __name__ == "__main__":
    main()
