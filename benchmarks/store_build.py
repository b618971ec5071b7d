"""Building the decoded store of a class-folder tree: in this process against worker processes, in one process run.

    python benchmarks/store_build.py --per-class 200 500 2000

For each count, the first ``count`` PNGs of each class of the real CIFAR-10 training split of ``../shared``
(links in a temporary folder) go into a fresh store at 32x32 twice: as ``run_tasks`` decides (the
first chunk here, the rest in workers only if it says they would take ``POOL_MIN_SECONDS``), and with the
workers forced (``POOL_MIN_SECONDS = 0``). It prints the seconds of reading the headers and of decoding, and
their ratio. The last line is machine-readable.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

from transfer_lightning.data import store, workers  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"


def linked_tree(root: Path, per_class: int) -> Path:
    for folder in sorted((SHARED / "data" / "cifar10" / "train").iterdir()):
        (root / folder.name).mkdir(parents=True)
        for file in sorted(folder.iterdir())[:per_class]:
            (root / folder.name / file.name).symlink_to(file.resolve())
    return root


def build_seconds(tree: Path, cache: Path) -> float:
    """Seconds to read every header (the tree's size) and decode the tree into a new store."""
    start = time.perf_counter()
    images = store.ImageFolderStore(tree, sorted(p.name for p in tree.iterdir()), cache)
    images.build(images.uniform_size())
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=int, nargs="+", default=[200, 500, 2000])
    args = parser.parse_args()
    if not (SHARED / "data" / "cifar10" / "train").is_dir():
        raise SystemExit(f"{SHARED}/data/cifar10/train is missing: this benchmark reads the project's ../shared.")
    chosen = workers.POOL_MIN_SECONDS
    print("| images | as decided s | workers forced s | ratio |\n| ---: | ---: | ---: | ---: |")
    ratios = []
    for per_class in args.per_class:
        with tempfile.TemporaryDirectory() as folder:
            tree = linked_tree(Path(folder) / "train", per_class)
            workers.POOL_MIN_SECONDS = chosen
            decided = build_seconds(tree, Path(folder) / "decided")
            workers.POOL_MIN_SECONDS = 0.0
            forced = build_seconds(tree, Path(folder) / "forced")
        ratios.append(f"{10 * per_class}={forced / decided:.2f}")
        print(f"| {10 * per_class} | {decided:.2f} | {forced:.2f} | x{forced / decided:.2f} |", flush=True)
    print("store_build " + " ".join(ratios))


if __name__ == "__main__":
    main()
