"""A decoded store larger than memory trains, with anonymous memory that does not grow with it.

    python benchmarks/store_memory.py                                   # 40,000 JPEGs -> 7.3 GiB decoded
    python benchmarks/store_memory.py --images 140000 --root /tmp/big   # 25.6 GiB decoded: more than 24 GiB of RAM

Writes a synthetic JPEG tree of ``--images`` photos (10 classes, random sizes between 300 and 700
px, smooth content so the files stay small) under ``--root``, and builds its decoded store for
``--image-size`` (stored at 8/7 of it: 256 for 224) with the package's data module. Then, each in
a fresh process, it trains MobileNetV2 for ``--batches`` augmented batches in random order on the
first ``--baseline-images`` of the store, and on the whole store, and prints for both the decoded
size of the training images beside the process's anonymous memory (``RssAnon`` of
``/proc/self/status``, where a copy of the data in memory would be) after setup and at its peak,
and the ratios. Equal peaks mean the data costs no anonymous memory; the pages of the map are
page cache, which the kernel drops under memory pressure.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

from transfer_lightning.data import ImageFolderDataModule  # noqa: E402
from transfer_lightning.model import TransferClassifier  # noqa: E402

CLASSES = 10


def memory_status() -> dict[str, int]:
    """RssAnon, RssFile and VmHWM of this process, in bytes."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("RssAnon", "RssFile", "VmHWM"):
            fields[name] = int(value.split()[0]) * 1024
    return fields


def write_photo(task: tuple[Path, int, int]) -> None:
    """One smooth synthetic photo: a class-coloured gradient with coarse noise, upsampled."""
    path, label, seed = task
    rng = np.random.default_rng(seed)
    width, height = rng.integers(300, 701, size=2)
    coarse = rng.integers(0, 120, size=(12, 12, 3)).astype(np.uint8)
    coarse[..., label % 3] += np.uint8(80 + 10 * (label // 3))
    Image.fromarray(coarse).resize((int(width), int(height)), Image.Resampling.BICUBIC).save(path, quality=85)


def write_tree(root: Path, images: int) -> None:
    tasks = []
    for index in range(images):
        label = index % CLASSES
        folder = root / "train" / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        tasks.append((folder / f"{index:06d}.jpg", label, index))
    for index in range(max(CLASSES * 10, images // 50)):  # a small val split
        label = index % CLASSES
        folder = root / "val" / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        tasks.append((folder / f"{index:06d}.jpg", label, 10**7 + index))
    start = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool() as pool:
        pool.map(write_photo, tasks, chunksize=64)
    print(f"wrote {len(tasks)} JPEGs under {root} in {time.perf_counter() - start:.0f} s", flush=True)


class MemoryProbe(pl.Callback):
    """Largest RssAnon seen after any training batch."""

    def __init__(self) -> None:
        self.peak_anon = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.peak_anon = max(self.peak_anon, memory_status()["RssAnon"])


def gib(size: float) -> str:
    return f"{size / 2**30:.2f} GiB"


def train_on_store(args: argparse.Namespace, images: int | None, results: multiprocessing.Queue) -> None:
    """Train ``args.batches`` batches on the store's first ``images`` training images (all if None)."""
    datamodule = ImageFolderDataModule(
        data_dir=str(args.root),
        cache_dir=str(args.root / "cache"),
        image_size=args.image_size,
        augment=True,
        batch_size=args.batch_size,
    )
    datamodule.setup("fit")
    if images is not None:
        datamodule.train_set = datamodule.train_set.subset(torch.arange(images))
    before = memory_status()["RssAnon"]
    probe = MemoryProbe()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=args.batches,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        callbacks=[probe],
    )
    start = time.perf_counter()
    model = TransferClassifier(backbone="mobilenet_v2", weights=None, num_classes=CLASSES)
    trainer.fit(model, datamodule)
    stored = datamodule.train_set.arrays.images
    decoded = len(datamodule.train_set) * stored[0].numel()
    results.put((len(datamodule.train_set), decoded, before, probe.peak_anon, time.perf_counter() - start))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("/tmp/transfer_lightning_store_benchmark"))
    parser.add_argument("--images", type=int, default=40000)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--baseline-images", type=int, default=1000)
    args = parser.parse_args()

    if not (args.root / "train").is_dir():
        write_tree(args.root, args.images)
    datamodule = ImageFolderDataModule(
        data_dir=str(args.root), cache_dir=str(args.root / "cache"), image_size=args.image_size
    )
    start = time.perf_counter()
    datamodule.prepare_data()
    print(f"store ready in {time.perf_counter() - start:.0f} s (built now, or found from an earlier run)", flush=True)

    # Each measurement in a fresh process, so that neither inherits the other's allocations.
    context = multiprocessing.get_context("spawn")
    rows = []
    for images in (args.baseline_images, None):
        results = context.Queue()
        process = context.Process(target=train_on_store, args=(args, images, results))
        process.start()
        rows.append(results.get())
        process.join()
    print(
        f"\n{args.batches} batches of {args.batch_size}, random order, augmented, MobileNetV2 at {args.image_size} px"
    )
    print(f"{'training images':>16} {'decoded size':>13} {'RssAnon setup':>14} {'RssAnon peak':>13} {'fit s':>6}")
    for count, decoded, before, peak, seconds in rows:
        print(f"{count:16d} {gib(decoded):>13} {gib(before):>14} {gib(peak):>13} {seconds:6.0f}")
    (_, _, _, small_peak, _), (_, decoded, _, peak, _) = rows
    print(f"peak RssAnon, whole store / {args.baseline_images} images: x{peak / small_peak:.2f}")
    print(f"decoded size / peak RssAnon: x{decoded / peak:.1f}")


if __name__ == "__main__":
    main()
