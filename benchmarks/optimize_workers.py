"""``optimize``: small splits written in this process against LitData's worker processes, in one process run.

    python benchmarks/optimize_workers.py --per-class 15 100 1000

For each count, the first ``count`` PNGs of each class of the real CIFAR-10 training split of ``../shared``
(links in a temporary folder, 10% held out for val) are optimized twice into new folders: as ``optimize``
decides (this process unless the first 32 images of a split say the rest takes ``POOL_MIN_SECONDS``), and with
LitData's workers forced (``POOL_MIN_SECONDS = 0``, two workers). It prints the seconds of each and their
ratio. The last line is machine-readable.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

from benchmarks.store_build import SHARED, linked_tree  # noqa: E402
from transfer_lightning.commands import optimize  # noqa: E402
from transfer_lightning.data import optimizing  # noqa: E402


def optimize_seconds(tree: Path, output: Path, workers: int) -> float:
    start = time.perf_counter()
    optimize.main([f"--data.data_dir={tree}", "--data.val_size=0.1", f"--workers={workers}",
                   f"--data.cache_dir={output.parent / 'cache'}", f"--output={output}"])  # fmt: skip
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=int, nargs="+", default=[15, 100, 1000])
    args = parser.parse_args()
    if not (SHARED / "data" / "cifar10" / "train").is_dir():
        raise SystemExit(f"{SHARED}/data/cifar10/train is missing: this benchmark reads the project's ../shared.")
    chosen, workers = optimizing.POOL_MIN_SECONDS, min(2, len(os.sched_getaffinity(0)))
    rows, ratios = [], []
    for per_class in args.per_class:
        with tempfile.TemporaryDirectory() as folder:
            tree = linked_tree(Path(folder) / "tree", per_class)
            optimizing.POOL_MIN_SECONDS = chosen
            decided = optimize_seconds(tree, Path(folder) / "decided", workers)
            optimizing.POOL_MIN_SECONDS = 0.0
            forced = optimize_seconds(tree, Path(folder) / "forced", workers)
        ratios.append(f"{10 * per_class}={forced / decided:.2f}")
        rows.append(f"| {10 * per_class} | {decided:.2f} | {forced:.2f} | x{forced / decided:.2f} |")
    print("| images | as decided s | LitData workers forced s | ratio |\n| ---: | ---: | ---: | ---: |")
    print("\n".join(rows))
    print("RESULT " + " ".join(ratios))


if __name__ == "__main__":
    main()
